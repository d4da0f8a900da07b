"""The layout of an SDXL-layout U-Net as pruning sees it, and the importance of its parts.

- Teacher tensors are read one at a time (``TensorSource``: a safetensors file, a state dict, or seeded random
  weights), never held whole, so pruning SDXL needs the student's memory plus a few teacher tensors.
- ``dims_of`` names the coupled *space* of every dim of every tensor: a set of channels that several tensors share (a
  block's residual stream and every skip connection taken from it, a ResNet's hidden channels, a transformer's inner
  width, a feed-forward's hidden units with both GEGLU halves, attention heads, the time embedding). What must shrink
  together is what shares a space.
- Importance: one score per channel of every space (``channel_scores`` from weights, ``activation_scores`` from
  calibration batches, ``taylor_saliency`` for taylor), one per transformer layer (``skip_scores`` measured,
  ``layer_norm_scores`` from weights).
- ``Plan``: what the student keeps (transformer layers per block, channels per space). The passes
  (``passes.py``) build it; ``materialize.py`` writes the student from it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn

from dreamlite.io import DreamliteError

Dims = tuple  # one entry per tensor dim: None (kept whole) or a tuple of space names (concatenated along that dim)


# ------------------------------------------------------------------------------------------------ teacher tensors
class TensorSource:
    """Read-only, name -> float32 tensor, one at a time."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in self._names

    @property
    def _names(self) -> set:
        if not hasattr(self, "_name_set"):
            self._name_set = set(self.keys())
        return self._name_set


class StateDictSource(TensorSource):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self):
        return list(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def get(self, name):
        return self.tensors[name].detach().float().cpu()


class SafetensorsSource(TensorSource):
    """Tensors read lazily from a safetensors file (memory-mapped; nothing is unpickled)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = str(path)
        self._file = safe_open(self.path, "pt")

    def keys(self):
        return list(self._file.keys())

    def shape(self, name):
        return tuple(self._file.get_slice(name).get_shape())

    def get(self, name):
        return self._file.get_tensor(name).float()


class RandomSource(TensorSource):
    """Seeded random weights for a model config, generated per tensor on request (so "random SDXL" never exists
    whole in memory): weights ~ N(0, 1/fan_in), norm gains 1, biases 0."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int = 0):
        self.shapes, self.seed = shapes, seed

    def keys(self):
        return list(self.shapes)

    def shape(self, name):
        return self.shapes[name]

    def get(self, name):
        shape = self.shapes[name]
        if len(shape) == 1:
            return torch.ones(shape) if re.search(r"norm[^.]*\.weight$", name) else torch.zeros(shape)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + sum(name.encode()) * 7919 + len(name))
        return torch.randn(shape, generator=g) / math.sqrt(int(np.prod(shape[1:])))


# -------------------------------------------------------------------------------------------------------- layout
_BLOCK = re.compile(r"^(down_blocks\.(\d+)|mid_block|up_blocks\.(\d+))\.")


def _stream(block: str) -> str:
    return block.replace("_blocks.", "").replace("mid_block", "mid")


def layers_per_block(cfg: dict) -> list[int]:
    n, lpb = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    return list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n


def skip_spaces(cfg: dict) -> list[list[str]]:
    """Per up block, the space of every skip connection its ResNets consume, in order (last pushed first)."""
    n, lpb = len(cfg["block_out_channels"]), layers_per_block(cfg)
    pushed = ["down0"]
    for s in range(n):
        pushed += [f"down{s}"] * lpb[s] + ([f"down{s}"] if s < n - 1 else [])
    pushed, out = pushed[::-1], []
    for u in range(n):
        out.append(pushed[:lpb[n - 1 - u] + 1])
        pushed = pushed[lpb[n - 1 - u] + 1:]
    return out


def _resnet_dims(m: re.Match, j: int, part: str, space: str, cfg: dict) -> Dims:
    """Spaces of the first two dims of ResNet ``j``'s tensor ``part`` in the block that ``m`` (``_BLOCK``) matched."""
    block = m.group(1)
    n = len(cfg["block_out_channels"])
    inner = (f"{block}.resnets.{j}",)
    if block.startswith("up_blocks"):
        u = int(m.group(3))
        hidden = (f"down{n - 1}" if u == 0 else f"up{u - 1}") if j == 0 else f"up{u}"
        into = (hidden, skip_spaces(cfg)[u][j])
    elif block == "mid_block" or j > 0 or m.group(2) == "0":
        into = (space,)
    else:
        into = (f"down{int(m.group(2)) - 1}",)
    out = (space,)
    table = {"norm1": (into,), "conv1": (inner, into), "time_emb_proj": (inner, ("temb",)), "norm2": (inner,),
             "conv2": (out, inner), "conv_shortcut": (out, into)}
    layer, kind = part.rsplit(".", 1)
    spaces = table[layer]
    return spaces if kind == "weight" else spaces[:1]


def _attention_dims(attn: str, part: str, space: str) -> Dims | None:
    """Spaces of the first two dims of tensor ``part`` of attention block ``attn``; None where no space applies."""
    x = (f"{attn}.x",)
    if part.startswith("norm."):
        return ((space,),)
    if part.startswith("proj_in."):
        return (x, (space,)) if part.endswith("weight") else (x,)
    if part.startswith("proj_out."):
        return ((space,), x) if part.endswith("weight") else ((space,),)
    t = re.match(r"transformer_blocks\.(\d+)\.(.*)$", part)
    if t is None:
        return None
    blk, sub = f"{attn}.transformer_blocks.{t.group(1)}", t.group(2)
    if re.match(r"norm\d\.", sub):
        return (x,)
    q = re.match(r"(attn\d)\.(to_q|to_k|to_v|to_out\.0|norm_q|norm_k)\.(weight|bias)$", sub)
    if q:
        heads = (f"{blk}.{q.group(1)}",)
        proj, kind = q.group(2), q.group(3)
        if proj == "to_out.0":
            return (x, heads) if kind == "weight" else (x,)
        if proj in ("norm_q", "norm_k"):
            return (None,)
        into = ("text",) if (q.group(1) == "attn2" and proj != "to_q") else x
        return (heads, into) if kind == "weight" else (heads,)
    ff = (f"{blk}.ff",)
    if sub.startswith("ff.net.0.proj."):  # GEGLU: [value; gate], both halves indexed by the same hidden units
        return (ff + ff, x) if sub.endswith("weight") else (ff + ff,)
    if sub.startswith("ff.net.2."):
        return (x, ff) if sub.endswith("weight") else (x,)
    return None


def dims_of(name: str, shape: tuple[int, ...], cfg: dict) -> Dims:
    """The coupled spaces of each dim of one U-Net tensor (teacher naming). The mid block shares the last down
    block's stream (its ResNets have no shortcut); a downsampler's output is the stream it samples."""
    n = len(cfg["block_out_channels"])
    last = f"down{n - 1}"
    rest = (None,) * (len(shape) - 2)  # a conv kernel's spatial dims; empty for vectors and matrices
    m = _BLOCK.match(name)
    if name.startswith("conv_in."):
        return (("down0",),) + (None,) * (len(shape) - 1)
    if name.startswith(("conv_norm_out.", "conv_out.")):
        up = (f"up{n - 1}",)
        if name.startswith("conv_norm_out."):
            return (up,)
        return (None, up) + rest if name.endswith("weight") else (None,)
    if name.startswith("time_embedding."):
        hidden, out = ("temb.hidden",), ("temb",)
        if ".linear_1." in name:
            return (hidden, None) if name.endswith("weight") else (hidden,)
        return (out, hidden) if name.endswith("weight") else (out,)
    if name.startswith("add_embedding."):
        hidden, out = ("add.hidden",), ("temb",)
        if ".linear_1." in name:
            return (hidden, None) if name.endswith("weight") else (hidden,)
        return (out, hidden) if name.endswith("weight") else (out,)
    if m is None:
        return (None,) * len(shape)
    block = m.group(1)
    stream = "mid" if block == "mid_block" else _stream(block)
    space = last if stream == "mid" else stream
    local = name[len(block) + 1:]
    if local.startswith(("downsamplers.", "upsamplers.")):
        return ((space,), (space,)) + rest if name.endswith("weight") else ((space,),)
    r = re.match(r"resnets\.(\d+)\.(.*)$", local)
    if r:
        return _resnet_dims(m, int(r.group(1)), r.group(2), space, cfg) + rest
    a = re.match(r"attentions\.(\d+)\.(.*)$", local)
    if a:
        dims = _attention_dims(f"{block}.attentions.{a.group(1)}", a.group(2), space)
        if dims is not None:
            return dims + rest
    return (None,) * len(shape)


@dataclass
class Space:
    size: int  # teacher channels
    groups: int = 1  # GroupNorm groups over these channels: keep the same number in each
    unit: int = 1  # channels per unit (an attention head): keep whole units


def teacher_spaces(source: TensorSource, cfg: dict) -> dict[str, Space]:
    spaces: dict[str, Space] = {}
    groups = cfg.get("norm_num_groups") or 32
    for name in source.keys():
        shape = source.shape(name)
        for d, names in enumerate(dims_of(name, shape, cfg)):
            if names is None:
                continue
            size = shape[d] // len(names) if len(set(names)) == 1 else None
            for s in names:
                if s in spaces or s == "text":
                    continue
                if size is None:
                    continue
                grouped = re.match(r"^(down\d+|up\d+|mid)$", s) or re.search(r"resnets\.\d+$", s)
                head = re.search(r"\.attn\d$", s)
                spaces[s] = Space(size, groups if grouped else 1, _head_dim(cfg, s, size) if head else 1)
    return spaces


def _head_dim(cfg: dict, space: str, width: int) -> int:
    """Channels per head of an attention space (SDXL-style configs give head COUNTS per block)."""
    heads = cfg.get("attention_head_dim") or 8
    if isinstance(heads, (list, tuple)):
        n = len(cfg["block_out_channels"])
        m = _BLOCK.match(space)
        stage = int(m.group(2)) if m.group(2) else n - 1 if m.group(1) == "mid_block" else n - 1 - int(m.group(3))
        heads = heads[stage]
    return width // heads


# ---------------------------------------------------------------------------------------------------- importance
def channel_scores(source: TensorSource, cfg: dict, spaces: dict[str, Space], criterion: str = "magnitude",
                   saliency: dict[str, torch.Tensor] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """One score per channel of every space, summed over every tensor that reads or writes it, streamed one teacher
    tensor at a time: magnitude = sum of w^2, taylor = sum of ``saliency`` (per weight, (w * dL/dw)^2 summed over
    calibration samples: ``target.taylor_saliency``),
    random = uniform noise (the control). Activation scores come from ``target.activation_scores`` instead."""
    if criterion not in ("magnitude", "taylor", "random"):
        raise DreamliteError(f"importance: {criterion!r} cannot be computed from weights (magnitude, taylor, random)")
    if criterion == "taylor" and saliency is None:  # otherwise every score is 0 and the choice is arbitrary
        raise DreamliteError("importance: 'taylor' needs the saliency of calibration batches (target.taylor_saliency)")
    scores = {s: torch.zeros(sp.size) for s, sp in spaces.items()}
    if criterion == "random":
        g = torch.Generator().manual_seed(seed)
        return {s: torch.rand(sp.size, generator=g) for s, sp in spaces.items()}
    for name in source.keys():
        dims = dims_of(name, source.shape(name), cfg)
        if all(d is None for d in dims):
            continue
        if criterion == "taylor":
            if saliency is None or name not in saliency:
                continue
            w = saliency[name]
        else:
            w = source.get(name).pow(2)
        for d, names in enumerate(dims):
            if names is None or any(n not in scores for n in names):
                continue
            per = w.sum(dim=[i for i in range(w.dim()) if i != d]) if w.dim() > 1 else w
            for k, part in enumerate(per.split([spaces[n].size for n in names])):
                scores[names[k]] += part
    return scores


def unet_call(model: nn.Module, b: dict, in_context: bool) -> dict:
    from dreamlite.models.conditioning import unet_inputs

    x = b["sample"]
    if in_context:
        x = torch.cat([x, torch.zeros_like(x)], dim=-1)  # (target | blank): generation
    return {"sample": x, "timestep": b["timestep"], **unet_inputs(model.config, b["text"], b["size"], b["size"])}


def taylor_saliency(unet: nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Per weight, sum over calibration samples of (w x dL/dw)^2, L the teacher's training loss (MSE to ``target``)
    on one sample: the squared first-order change of the loss when the weight is removed (Molchanov et al. 2019;
    Diff-Pruning spreads the samples over timesteps, as the calibration batches are). Squaring per sample matters:
    a trained teacher sits near a minimum, so gradients summed over samples partly cancel (docs/pruning.md measures both)."""
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    with torch.enable_grad():
        for b in batches:
            for i in range(len(b["target"])):
                one = {**b, "sample": b["sample"][i:i + 1], "timestep": b["timestep"][i:i + 1],
                       "text": b["text"][i:i + 1]}
                unet.zero_grad(set_to_none=True)
                pred = unet(**unet_call(unet, one, False)).sample
                (pred - b["target"][i:i + 1]).pow(2).mean().backward()
                for n, p in params.items():
                    if p.grad is not None:
                        out[n] += (p.detach() * p.grad).pow(2)
    unet.zero_grad(set_to_none=True)
    return out


@torch.no_grad()
def activation_scores(unet: nn.Module, batches: list[dict], cfg: dict, spaces: dict) -> dict[str, torch.Tensor]:
    """Mean |output| of every channel of every space, from the conv / linear layers that write it."""
    scores = {s: torch.zeros(sp.size) for s, sp in spaces.items()}
    hooks = []

    def hook_for(names):
        def hook(module, args, out):
            dims = (0, 2, 3) if out.dim() == 4 else tuple(range(out.dim() - 1))
            act = out.abs().float().mean(dims)
            for k, part in enumerate(act.split([spaces[n].size for n in names])):
                scores[names[k]] += part
        return hook

    for name, module in unet.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            w = f"{name}.weight"
            names = dims_of(w, tuple(module.weight.shape), cfg)[0]
            if names and all(n in spaces for n in names):
                hooks.append(module.register_forward_hook(hook_for(names)))
    try:
        for b in batches:
            unet(**unet_call(unet, b, False))
    finally:
        for h in hooks:
            h.remove()
    return scores


def select(scores: torch.Tensor, keep: int, space: Space) -> torch.Tensor:
    """Indices (sorted) of the ``keep`` best channels: whole units, and the same number in every group."""
    if keep > space.size:
        raise DreamliteError(f"cannot keep {keep} of {space.size} channels")
    if space.unit > 1:
        if keep % space.unit:
            raise DreamliteError(f"{keep} channels is not a whole number of {space.unit}-channel heads")
        per_unit = scores.view(-1, space.unit).sum(1)
        units = per_unit.topk(keep // space.unit).indices.sort().values
        return (units[:, None] * space.unit + torch.arange(space.unit)).flatten()
    g = space.groups
    if g > 1 and keep % g == 0 and space.size % g == 0:
        per = scores.view(g, -1)
        top = per.topk(keep // g, dim=1).indices.sort(dim=1).values
        return (top + torch.arange(g)[:, None] * (space.size // g)).flatten()
    return scores.topk(keep).indices.sort().values


# ---------------------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """What the student keeps of the teacher, as teacher indices: per attention block (teacher name), which
    transformer layers; per space, which channels; per down / up block, which layers (a ResNet and the attention
    block after it). Built by the passes, consumed by ``materialize``."""
    layers: dict[str, list[int]] = field(default_factory=dict)
    keep: dict[str, torch.Tensor] = field(default_factory=dict)
    report: list[dict] = field(default_factory=list)
    blocks: dict[str, list[int]] = field(default_factory=dict)

    def index(self, names: tuple[str, ...], sizes: dict[str, int]) -> torch.Tensor:
        parts, offset = [], 0
        for n in names:
            parts.append(self.keep[n] + offset)
            offset += sizes[n]
        return torch.cat(parts)


def transformer_depths(keys: Iterable[str]) -> dict[str, int]:
    """Number of transformer layers of every attention block, from a list of parameter names."""
    depth: dict[str, int] = {}
    for k in keys:
        m = re.match(r"^(.*attentions\.\d+)\.transformer_blocks\.(\d+)\.", k)
        if m:
            depth[m.group(1)] = max(depth.get(m.group(1), 0), int(m.group(2)) + 1)
    return depth


def layer_norm_scores(source: TensorSource, attn: str, depth: int) -> list[float]:
    """Weight-only proxy for a transformer layer's importance: the squared norm of what it writes into the
    residual stream (its attention output projections and the feed-forward's down projection)."""
    out = []
    for b in range(depth):
        total = 0.0
        for part in ("attn1.to_out.0.weight", "attn2.to_out.0.weight", "ff.net.2.weight"):
            name = f"{attn}.transformer_blocks.{b}.{part}"
            if name in source:
                total += float(source.get(name).pow(2).sum())
        out.append(total)
    return out


@torch.no_grad()
def skip_scores(unet: nn.Module, batches: list[dict]) -> dict[str, list[float]]:
    """Measured importance of every transformer layer: the relative change of the U-Net's output on calibration
    batches when the layer is skipped (its input passed through unchanged)."""
    def call():
        return [unet(**b).sample for b in batches]

    reference = call()
    scale = sum(float(r.pow(2).mean()) for r in reference) or 1.0
    out: dict[str, list[float]] = {}
    for name, module in unet.named_modules():
        m = re.match(r"^(.*attentions\.\d+)\.transformer_blocks\.(\d+)$", name)
        if not m:
            continue
        forward = module.forward
        module.forward = lambda hidden_states, *a, **k: hidden_states
        try:
            change = sum(float((o - r).pow(2).mean()) for o, r in zip(call(), reference)) / scale
        finally:
            module.forward = forward
        out.setdefault(m.group(1), []).append(change)
    return out


LAYER_NAME = re.compile(r"^((?:down|up)_blocks\.\d+)\.(resnets|attentions)\.(\d+)(\..*)?$")


def block_layers(keys: Iterable[str]) -> dict[str, int]:
    """Number of layers (ResNets) of every down and up block, from a list of parameter names."""
    out: dict[str, int] = {}
    for k in keys:
        m = LAYER_NAME.match(k)
        if m and m.group(2) == "resnets":
            out[m.group(1)] = max(out.get(m.group(1), 0), int(m.group(3)) + 1)
    return out


def removable_layers(block: str, n_layers: int, n_stages: int) -> list[int]:
    """Which layers of a block can go without changing what the others read: not a down block's first layer
    (after stage 0 it widens the stream), not an up block's first (it reads the stage below) nor, above the last
    stage, its last (it reads the skip across stages)."""
    stage = int(block.rsplit(".", 1)[1])
    if block.startswith("down_blocks"):
        return list(range(n_layers)) if stage == 0 else list(range(1, n_layers))
    return list(range(1, n_layers if stage == n_stages - 1 else n_layers - 1))


def block_norm_scores(source: TensorSource, block: str, n_layers: int) -> list[float]:
    """Weight-only proxy for a block layer's importance: the squared norm of what its ResNet's second conv and its
    attention block's output projection write."""
    out = []
    for j in range(n_layers):
        names = (f"{block}.resnets.{j}.conv2.weight", f"{block}.attentions.{j}.proj_out.weight")
        out.append(sum(float(source.get(n).pow(2).sum()) for n in names if n in source))
    return out


@torch.no_grad()
def block_skip_scores(unet: nn.Module, batches: list[dict], candidates: dict[str, list[int]]) -> dict[str, list]:
    """Measured importance of block layers: the relative change of the U-Net's output on calibration batches when a
    layer's ResNet passes its input through (an up block's drops the skip it concatenates) and its attention block
    is skipped. Layers not in ``candidates`` score None."""
    reference = [unet(**b).sample for b in batches]
    scale = sum(float(r.pow(2).mean()) for r in reference) or 1.0
    out: dict[str, list] = {}
    for block, allowed in candidates.items():
        module = unet.get_submodule(block)
        out[block] = [None] * len(module.resnets)
        for j in allowed:
            res = module.resnets[j]
            attn = module.attentions[j] if len(getattr(module, "attentions", None) or []) > j else None
            saved = [(m, m.forward) for m in (res, attn) if m is not None]
            res.forward = lambda x, *a, width=res.out_channels, **k: x[:, :width]
            if attn is not None:
                attn.forward = lambda hidden_states, *a, **k: (hidden_states,)
            try:
                out[block][j] = sum(float((unet(**b).sample - r).pow(2).mean())
                                    for b, r in zip(batches, reference)) / scale
            finally:
                for m, f in saved:
                    m.forward = f
    return out


def student_name_to_teacher(name: str, plan: Plan) -> str:
    m = LAYER_NAME.match(name)
    if m and m.group(1) in plan.blocks:
        name = f"{m.group(1)}.{m.group(2)}.{plan.blocks[m.group(1)][int(m.group(3))]}{m.group(4) or ''}"
    m = re.match(r"^(.*attentions\.\d+)\.transformer_blocks\.(\d+)\.(.*)$", name)
    if m and m.group(1) in plan.layers:
        return f"{m.group(1)}.transformer_blocks.{plan.layers[m.group(1)][int(m.group(2))]}.{m.group(3)}"
    return name


def target_sizes(student_sd: dict[str, torch.Tensor], source: TensorSource, tcfg: dict, scfg: dict,
                 plan: Plan) -> dict[str, int]:
    """How many channels of each teacher space the student has, read from the student's own tensor shapes."""
    expand = 2 if scfg.get("use_sep_conv") else 1
    sizes: dict[str, int] = {}

    def need(space: str, n: int, name: str):
        if sizes.setdefault(space, n) != n:
            raise DreamliteError(f"{name}: the target gives {space} {n} channels, another tensor {sizes[space]}")

    for name, t in student_sd.items():
        tname = student_name_to_teacher(name, plan)
        if tname not in source or re.search(r"\.(to_k|to_v)\.weight$", name):
            continue
        for d, names in enumerate(dims_of(tname, source.shape(tname), tcfg)):
            if names is None or "text" in names or len(set(names)) != 1:
                continue
            n = t.shape[d] // len(names)
            if re.search(r"resnets\.\d+$", names[0]):
                n //= expand
            need(names[0], n, name)
    return sizes
