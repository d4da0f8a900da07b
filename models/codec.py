"""Codecs between images and latents: the shapes world's lossless pixel-unshuffle and diffusers VAEs, one interface.

Images are ``(B, 3, H, W)`` in [-1, 1]; latents ``(B, C, H / f, W / f)``, already scaled for the U-Net.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from dreamlite.io import DreamliteError, read_json


class Codec(Protocol):
    channels: int  # latent channels C
    factor: int  # spatial down-sampling f

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class PixelUnshuffleCodec:
    """Space-to-depth: every ``f x f`` patch becomes ``3 f^2`` channels (64x64x3 <-> 48x16x16 at f = 4). Exact."""

    bounded = True  # latents are pixels in [-1, 1]

    def __init__(self, factor: int = 4):
        self.factor = factor
        self.channels = 3 * factor * factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        if h % self.factor or w % self.factor:
            raise DreamliteError(f"image size {h}x{w}: must be a multiple of {self.factor} for this codec")
        return F.pixel_unshuffle(images, self.factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.factor)


class VAECodec:
    """A diffusers ``AutoencoderKL`` or ``AutoencoderTiny`` from a local folder; latents are scaled (and shifted)
    by the VAE's own config so the U-Net sees unit-variance inputs."""

    bounded = False

    def __init__(self, folder, dtype: torch.dtype = torch.float32):
        import diffusers

        folder = Path(folder)
        cfg = read_json(folder / "config.json")
        name = cfg.get("_class_name") if isinstance(cfg, dict) else None
        if name not in ("AutoencoderKL", "AutoencoderTiny"):
            raise DreamliteError(f"{folder / 'config.json'}: _class_name {name!r} is not AutoencoderKL or "
                                 "AutoencoderTiny")
        self.vae = getattr(diffusers, name).from_pretrained(folder, torch_dtype=dtype, use_safetensors=True).eval()
        c = self.vae.config
        self.channels = c.latent_channels
        self.factor = 2 ** (len(c.block_out_channels) - 1) if name == "AutoencoderKL" else 8
        self.scale = getattr(c, "scaling_factor", 1.0) or 1.0
        self.shift = getattr(c, "shift_factor", None) or 0.0
        self.tiny = name == "AutoencoderTiny"

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.tiny:
            return self.vae.encode(images).latents
        return (self.vae.encode(images).latent_dist.mode() - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.tiny:
            return self.vae.decode(latents).sample.clamp(-1, 1)
        return self.vae.decode(latents / self.scale + self.shift).sample.clamp(-1, 1)


def to_uint8(images: torch.Tensor):
    """(B, 3, H, W) in [-1, 1] -> numpy uint8 (B, H, W, 3)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
