"""Footprint of a U-Net: parameters, bytes, and multiply-accumulates per call, all without allocating weights."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dreamlite.models.conditioning import SDXL_TIME_IDS, unet_inputs
from dreamlite.models.text import TextStates


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def text_shapes(config: dict, tokens: int) -> tuple[int, int]:
    """(token width, pooled width) the U-Net's config expects from its text encoder."""
    width = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    pooled = 0
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - SDXL_TIME_IDS * config["addition_time_embed_dim"]
    return width, pooled


def macs_per_module(unet: torch.nn.Module, latent_hw: tuple[int, int], image_hw: tuple[int, int],
                    text_tokens: int = 77) -> dict[str, int]:
    """Multiply-accumulates of one U-Net call at batch 1 per module, each module's own (its children's excluded; the
    key "" is the top level), counted by torch's FlopCounterMode on the meta device (convolutions, matmuls and
    attention; norms and activations are not counted)."""
    config = dict(unet.config)
    width, pooled = text_shapes(config, text_tokens)
    with torch.device("meta"):
        meta = type(unet).from_config(config)  # a weightless twin: the caller's model is never touched
        x = torch.empty(1, config["in_channels"], *latent_hw)
        text = TextStates(torch.empty(1, text_tokens, width), torch.empty(1, pooled))
        with FlopCounterMode(display=False) as counter:
            meta(x, torch.empty(1), **unet_inputs(config, text, *image_hw))
    prefix = type(meta).__name__
    total = {k[len(prefix) + 1:] if k != prefix else "": sum(v.values()) // 2
             for k, v in counter.get_flop_counts().items() if k == prefix or k.startswith(prefix + ".")}
    own = dict(total)
    for name, value in total.items():
        parent = name
        while parent:  # the nearest counted ancestor (containers such as ModuleLists are not counted)
            parent = parent.rsplit(".", 1)[0] if "." in parent else ""
            if parent in total:
                own[parent] -= value
                break
    return own


def macs_per_call(unet: torch.nn.Module, latent_hw: tuple[int, int], image_hw: tuple[int, int],
                  text_tokens: int = 77) -> int:
    """Multiply-accumulates of one U-Net call at batch 1 (see ``macs_per_module``)."""
    return sum(macs_per_module(unet, latent_hw, image_hw, text_tokens).values())


def folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def footprint(bundle, text_tokens: int | None = None) -> dict:
    """What ``dreamlite info`` prints: class, parameters, bytes (on disk, and as fp32 / fp16 weights), MACs per
    call at the model's default size (in-context width included), prediction type and latent shape."""
    unet = bundle.unet
    n = parameters(unet)
    h = bundle.latent_size()
    w = h * (2 if bundle.in_context else 1)
    tokens = text_tokens or bundle.text_tokens
    return {
        "name": bundle.name, "class": type(unet).__name__, "parameters": n,
        "bytes_on_disk": folder_bytes(bundle.folder) if bundle.folder else None,
        "bytes_fp32": 4 * n, "bytes_fp16": 2 * n,
        "macs_per_call": macs_per_call(unet, (h, w), (bundle.image_size, bundle.image_size), tokens),
        "image_size": bundle.image_size, "latent": [unet.config.in_channels, h, w], "in_context": bundle.in_context,
        "prediction": bundle.prediction, "text_tokens": tokens,
    }
