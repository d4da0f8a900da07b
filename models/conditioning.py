"""What a U-Net call needs besides the latent: text states and the addition-embedding inputs its config asks for.

SDXL (``text_time``): pooled text + 6 time ids (orig h, orig w, crop top, crop left, target h, target w).
DreamLite (``time``): time ids only; the number of ids follows from the config (2 in the released model: h, w).
"""
from __future__ import annotations

import torch

from .text import TextStates

SDXL_TIME_IDS = 6


def num_time_ids(config, pooled_width: int = 0) -> int:
    kind = config.get("addition_embed_type")
    dim = config.get("addition_time_embed_dim") or 0
    total = config.get("projection_class_embeddings_input_dim") or 0
    if kind == "text_time":
        return (total - pooled_width) // dim
    if kind == "time":
        return total // dim
    return 0


def time_ids(config, height: int, width: int, batch: int, pooled_width: int = 0) -> torch.Tensor | None:
    """(B, n) float time ids for an image of ``height`` x ``width`` pixels (the target, not the in-context pair)."""
    n = num_time_ids(config, pooled_width)
    if n == 0:
        return None
    base = [height, width, 0, 0, height, width] if n == SDXL_TIME_IDS else ([height, width] * n)[:n]
    return torch.tensor(base, dtype=torch.float32).expand(batch, n)


def unet_inputs(config, text: TextStates, height: int, width: int) -> dict:
    """Keyword arguments for ``unet(sample, timestep, **unet_inputs(...))``."""
    kind = config.get("addition_embed_type")
    kwargs: dict = {"encoder_hidden_states": text.states}
    if kind in ("text_time", "time"):
        ids = time_ids(config, height, width, text.states.shape[0], text.pooled.shape[-1])
        added = {"time_ids": ids.to(text.states.device, text.states.dtype)}
        if kind == "text_time":
            added["text_embeds"] = text.pooled
        kwargs["added_cond_kwargs"] = added
    return kwargs
