"""Perturbations the judge must be robust to: sensor noise, blur, JPEG, and sub-pixel jitter of object positions."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from .spec import Scene


@dataclass(frozen=True)
class Perturbation:
    noise: float = 0.0  # Gaussian noise sigma, in 1/255 units
    blur: float = 0.0  # Gaussian blur sigma, px
    jpeg: int = 0  # JPEG quality (0 = none)
    shift: float = 0.0  # each object moved by up to this many px (uniform in a disc)

    def __bool__(self) -> bool:
        return bool(self.noise or self.blur or self.jpeg or self.shift)


def jitter(scene: Scene, rng: np.random.Generator, px: float, canvas: int) -> Scene:
    objs = []
    for o in scene.objects:
        r, a = px * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        objs.append(o.moved(o.cx + r * np.cos(a) / canvas, o.cy + r * np.sin(a) / canvas))
    return scene.with_objects(objs)


def degrade(img: np.ndarray, p: Perturbation, rng: np.random.Generator) -> np.ndarray:
    """Apply blur, then noise, then JPEG to an (H, W, 3) uint8 image."""
    out = img.astype(np.float64)
    if p.blur:
        out = ndimage.gaussian_filter(out, sigma=(p.blur, p.blur, 0))
    if p.noise:
        out = out + rng.normal(0.0, p.noise, out.shape)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if p.jpeg:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(p.jpeg))
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out
