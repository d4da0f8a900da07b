"""Text encoders: one interface, the shapes world's small transformer, and the adapter real encoders plug into.

Every encoder turns a list of prompts into ``TextStates``: per-token states for cross-attention ``(B, L, D)`` and a
pooled vector ``(B, P)`` for SDXL's ``text_time`` embedding. U-Nets with ``addition_embed_type="time"`` (DreamLite)
ignore the pooled vector.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from dreamlite.evaluation.shapes.spec import COLORS
from dreamlite.evaluation.shapes.text import NUMBERS, SIDES, bindings, tokenize, vocabulary
from dreamlite.io import DreamliteError, atomic_path, read_json, write_json

SPECIALS = ("<pad>", "<bos>")


@dataclass
class TextStates:
    states: torch.Tensor  # (B, L, D)
    pooled: torch.Tensor  # (B, P)

    def __getitem__(self, index) -> "TextStates":
        return TextStates(self.states[index], self.pooled[index])

    @staticmethod
    def cat(parts: list["TextStates"]) -> "TextStates":
        return TextStates(torch.cat([p.states for p in parts]), torch.cat([p.pooled for p in parts]))


class TextEncoder(Protocol):
    width: int  # D
    pooled_width: int  # P

    def encode(self, prompts: list[str]) -> TextStates: ...


class UnknownWordError(DreamliteError):
    pass


@dataclass
class ShapesTextConfig:
    vocab: list[str]
    width: int = 64
    layers: int = 2
    heads: int = 4
    ff: int = 128
    max_tokens: int = 24  # including <bos>


class ShapesTextEncoder(nn.Module):
    """A pre-norm transformer over the shapes world's closed vocabulary; pooled = the final <bos> state.

    Prompts are lower-cased and split on spaces; a word outside the vocabulary raises ``UnknownWordError``. The empty
    prompt (used for classifier-free guidance) is just ``<bos>``.
    """

    def __init__(self, config: ShapesTextConfig):
        super().__init__()
        self.config = config
        self.index = {w: i for i, w in enumerate([*SPECIALS, *config.vocab])}
        self.width = self.pooled_width = config.width
        self.embed = nn.Embedding(len(self.index), config.width)
        self.position = nn.Parameter(torch.randn(config.max_tokens, config.width) * 0.02)
        layer = nn.TransformerEncoderLayer(config.width, config.heads, config.ff, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)

    @classmethod
    def for_shapes(cls, **kw) -> "ShapesTextEncoder":
        return cls(ShapesTextConfig(vocab=vocabulary(), **kw))

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids (B, L) and key padding mask (B, L), True where padded; L is always ``max_tokens`` (as CLIP pads
        to 77), so a prompt's states do not depend on what else is in the batch or on the runtime."""
        rows = []
        for p in prompts:
            words = tokenize(p)
            unknown = [w for w in words if w not in self.index or w in SPECIALS]
            if unknown:
                raise UnknownWordError(f"prompt {p!r}: word {unknown[0]!r} is not in the text encoder's vocabulary "
                                       f"({len(self.config.vocab)} words; see `dreamlite.evaluation.shapes.text`)")
            if len(words) + 1 > self.config.max_tokens:
                raise DreamliteError(f"prompt {p!r}: {len(words)} words, the text encoder takes at most "
                                     f"{self.config.max_tokens - 1}")
            rows.append([1] + [self.index[w] for w in words])
        ids = torch.zeros(len(rows), self.config.max_tokens, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        return ids, ids == 0

    def forward(self, ids: torch.Tensor, pad: torch.Tensor) -> TextStates:
        h = self.embed(ids) + self.position[: ids.shape[1]]
        h = self.norm(self.blocks(h, src_key_padding_mask=pad))
        h = h.masked_fill(pad[..., None], 0.0)  # padded tokens carry nothing into cross-attention
        return TextStates(h, h[:, 0])

    def encode(self, prompts: list[str]) -> TextStates:
        ids, pad = self.tokenize(prompts)
        p = next(self.parameters())
        return self(ids.to(p.device), pad.to(p.device))

    # --------------------------------------------------------------------------------------------- save / load
    def save_pretrained(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "config.json", {"_class_name": "ShapesTextEncoder", **asdict(self.config)})
        with atomic_path(folder / "model.safetensors") as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp))

    @classmethod
    def from_pretrained(cls, folder) -> "ShapesTextEncoder":
        folder = Path(folder)
        cfg = read_json(folder / "config.json")
        if not isinstance(cfg, dict) or cfg.pop("_class_name", None) != "ShapesTextEncoder":
            raise DreamliteError(f"{folder / 'config.json'}: not a ShapesTextEncoder config")
        try:
            enc = cls(ShapesTextConfig(**cfg))
        except TypeError as e:
            raise DreamliteError(f"{folder / 'config.json'}: {e}") from None
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise DreamliteError(f"{weights}: missing")
        missing, unexpected = enc.load_state_dict(load_file(str(weights)), strict=False)
        if missing or unexpected:
            raise DreamliteError(f"{weights}: does not match its config ({len(missing)} missing, "
                                 f"{len(unexpected)} unexpected tensors)")
        return enc.eval().requires_grad_(False)


class BindingHead(nn.Module):
    """A text-side objective for a text encoder trained from scratch: linear heads read, from the state of each
    shape word, the colour its caption gives that object (or none), its count, and in a position caption the side
    it is on (or none). Diffusion's loss alone leaves these out of the shape words' states (a linear probe reads
    them no better than from a random encoder: ``benchmarks/text_binding.py``), and they are the direct path by
    which cross-attention at a shape's location can read that shape's colour or side. Captions parse with
    ``bindings``; state 0 is ``<bos>``."""

    def __init__(self, width: int):
        super().__init__()
        self.color = nn.Linear(width, len(COLORS) + 1)  # the last class: no colour given
        self.count = nn.Linear(width, len(NUMBERS) + 1)  # one, two, three, four
        self.side = nn.Linear(width, len(SIDES) + 1)  # the last class: not a position caption

    @staticmethod
    def targets(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (rows, cols) token positions of the shape words (N,) and their classes (N, 3): colour, count, side."""
        colors, where, labels = list(COLORS), [], []
        for i, caption in enumerate(captions):
            for b in bindings(caption):
                where.append((i, b.word + 1))
                labels.append((colors.index(b.color) if b.color else len(colors), b.count - 1,
                               SIDES.index(b.side) if b.side else len(SIDES)))
        return (torch.tensor(where, dtype=torch.long).reshape(-1, 2),
                torch.tensor(labels, dtype=torch.long).reshape(-1, 3))

    def forward(self, states: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Mean cross-entropy of the three heads over every shape word of the batch; 0 when there is none."""
        where, labels = self.targets(captions)
        if not len(where):
            return states.sum() * 0.0
        h = states[where[:, 0], where[:, 1]].float()
        labels = labels.to(h.device)
        return sum(nn.functional.cross_entropy(head(h), labels[:, k])
                   for k, head in enumerate((self.color, self.count, self.side))) / 3


class HFTextEncoder:
    """A transformers text encoder from a local folder (CLIP text model, or a decoder such as Qwen3-VL's language
    model): states = last hidden state, pooled = ``text_embeds`` / ``pooler_output`` when the model has one, else
    the last token's state. Needs ``pip install transformers``; nothing is downloaded."""

    def __init__(self, folder, max_tokens: int = 77):
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise DreamliteError("real text encoders need transformers: pip install transformers") from None
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
        self.max_tokens = max_tokens
        cfg = getattr(self.model.config, "text_config", self.model.config)
        self.width = cfg.hidden_size
        self.pooled_width = getattr(cfg, "projection_dim", None) or self.width

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextStates:
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        out = self.model(**tok)
        states = out.last_hidden_state
        pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            last = tok["attention_mask"].sum(1) - 1
            pooled = states[torch.arange(len(prompts)), last]
        return TextStates(states, pooled)


def load_text_encoder(folder) -> TextEncoder:
    """A text encoder folder: the shapes encoder (config ``_class_name`` ShapesTextEncoder) or a transformers one."""
    folder = Path(folder)
    cfg = folder / "config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("_class_name") == "ShapesTextEncoder":
        return ShapesTextEncoder.from_pretrained(folder)
    return HFTextEncoder(folder)
