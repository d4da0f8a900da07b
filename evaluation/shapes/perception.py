"""The judge's eyes: parse an RGB image into a scene (background; per object shape, colour, centre, size, style).

Each pixel is explained as a blend ``bg + alpha * (colour - bg)`` of the background and one palette colour, which makes
anti-aliasing, blur and mild noise part of the model rather than errors. Connected regions of alpha > 0.5 are objects;
the shape is the template (rendered at the region's centroid and area) that best fits the soft, hole-filled silhouette;
the style compares the ink inside the silhouette with what an outline of that shape would leave.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .render import POLYGONS, UNIT_AREA, box, pixel_grid, render_layers, signed_distance
from .spec import BACKGROUNDS, COLOR_ARRAY, COLOR_NAMES, SHAPES, STROKE, Obj, Scene

_EIGHT = np.ones((3, 3), bool)
_BG_NAMES = tuple(BACKGROUNDS)
_BG_ARRAY = np.array(list(BACKGROUNDS.values()), np.float32)
MIN_OBJECT_AREA = 0.002  # fraction of the canvas; smaller regions are fragments, not objects
_LUT_HALF, _LUT_SIZE = 2.5, 401  # unit-radius signed distances tabulated on [-2.5, 2.5]^2
# Template variants tried for the best shapes: (dilation px, edge softness px). Other renderers draw shapes slightly
# fatter or thinner (PIL fills its boundary pixels) and blur softens edges; a fixed crisp template would misread both.
_VARIANTS = ((0.5, 1.0), (1.0, 1.0), (-0.5, 1.0), (0.0, 2.0), (0.5, 2.0))
_PERIMETER = {"circle": 2 * math.pi, **{s: float(np.linalg.norm(np.roll(v, -1, 0) - v, axis=1).sum())
                                       for s, v in POLYGONS.items()}}


class ImageError(ValueError):
    pass


@dataclass(frozen=True)
class Seen(Obj):
    """A parsed object: the scene fields plus its bounding box (canvas fractions) and shape-fit error (lower = surer)."""
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    fit: float = 0.0


@dataclass
class Parsed:
    background: str
    objects: list[Seen]
    fragments: int = 0  # foreground regions too small to be objects
    fragment_area: float = 0.0  # their area, fraction of the canvas
    extra: dict = field(default_factory=dict)
    unexplained: float = 0.0  # fraction of pixels no blend of the background and one palette colour explains

    def scene(self) -> Scene:
        return Scene(self.background, tuple(Obj(o.shape, o.color, o.cx, o.cy, o.size, o.style) for o in self.objects))


def as_rgb(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise ImageError(f"expected an RGB image, got an array of shape {img.shape}")
    if img.shape[0] != img.shape[1] or img.shape[0] < 16:
        raise ImageError(f"expected a square image of at least 16 px, got {img.shape[1]}x{img.shape[0]}")
    return img[..., :3]


# A pixel further than this (squared RGB distance) from every background/palette blend is not part of a scene:
# anti-aliasing, blur, JPEG and sensor noise stay well inside it; the speckle of an unfinished sampler does not.
UNEXPLAINED_RESIDUAL = 48.0 ** 2


def _blend_fit(x: np.ndarray, colors: np.ndarray):
    """For pixels x (N, 3) relative to the background: best palette colour, its alpha, and the squared residual."""
    d = colors  # (K, 3), relative to the background
    dd = (d * d).sum(1)
    dot = x @ d.T  # (N, K)
    alpha = np.clip(dot / dd, 0.0, 1.0)
    resid = (x * x).sum(1, keepdims=True) - 2 * alpha * dot + alpha**2 * dd
    best = resid.argmin(1)
    rows = np.arange(len(x))
    return best, alpha[rows, best], resid[rows, best], alpha


def parse(image) -> Parsed:
    img = as_rgb(image).astype(np.float32)
    n = img.shape[0]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_rgb = np.median(border, 0)
    background = _BG_NAMES[int(((_BG_ARRAY - bg_rgb) ** 2).sum(1).argmin())]
    best, a, resid, alpha_all = _blend_fit((img - bg_rgb).reshape(-1, 3), COLOR_ARRAY - bg_rgb)
    unexplained = float((resid > UNEXPLAINED_RESIDUAL).mean())
    best, a = best.reshape(n, n), a.reshape(n, n)
    alpha_all = alpha_all.reshape(n, n, -1)
    labels, count = ndimage.label(a > 0.5, structure=_EIGHT)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    objects, fragments, fragment_area = [], 0, 0.0
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        if areas[k] < max(4.0, MIN_OBJECT_AREA * n * n):
            fragments += 1
            fragment_area += areas[k] / (n * n)
            continue
        seen = _read_object(labels, k, sl, best, a, alpha_all, n)
        if seen is not None:
            objects.append(seen)
    return Parsed(background, objects, fragments, fragment_area, {"bg_rgb": bg_rgb.tolist()}, unexplained)


@functools.cache
def _unit_sdf(shape: str) -> np.ndarray:
    axis = np.linspace(-_LUT_HALF, _LUT_HALF, _LUT_SIZE)
    py, px = np.meshgrid(axis, axis, indexing="ij")
    return signed_distance(shape, px, py, 0.0, 0.0, 1.0).astype(np.float32)


def _distance(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Signed distance in px from a shape of radius r px; (u, v) are pixel offsets from its centre divided by r."""
    scale = (_LUT_SIZE - 1) / (2 * _LUT_HALF)
    coords = np.stack([(v + _LUT_HALF) * scale, (u + _LUT_HALF) * scale])
    return r * ndimage.map_coordinates(_unit_sdf(shape), coords, order=1, mode="nearest")


def _radius(shape: str, area: float, dilation: float) -> float:
    """Radius whose shape, grown by ``dilation`` px, has ``area`` (Steiner: A = k r^2 + P r d + pi d^2)."""
    k, p = UNIT_AREA[shape], _PERIMETER[shape]
    c = area - math.pi * dilation * abs(dilation)
    return max(0.5, (-p * dilation + math.sqrt(max((p * dilation) ** 2 + 4 * k * c, 0.0))) / (2 * k))


def _fit(shape, silhouette, px, py, cx, cy, area, dilation=0.0, soft=1.0):
    r = _radius(shape, area, dilation)
    d = _distance(shape, (px - cx) / r, (py - cy) / r, r) - dilation
    cov = np.clip(0.5 - d / soft, 0.0, 1.0)
    return float(np.abs(silhouette - cov).sum() / area), r, d


def _read_object(labels, k, sl, best, a, alpha_all, n) -> Seen | None:
    y0, y1 = max(0, sl[0].start - 2), min(n, sl[0].stop + 2)
    x0, x1 = max(0, sl[1].start - 2), min(n, sl[1].stop + 2)
    lab = labels[y0:y1, x0:x1]
    mask = lab == k
    votes = np.bincount(best[y0:y1, x0:x1][mask], weights=a[y0:y1, x0:x1][mask] ** 2, minlength=len(COLOR_NAMES))
    c = int(votes.argmax())
    ac = alpha_all[y0:y1, x0:x1, c]
    filled = ndimage.binary_fill_holes(mask)
    holes = filled & ~mask
    ring = ndimage.binary_dilation(filled, structure=_EIGHT) & ~filled & (lab == 0)
    ink_map = np.where(mask | ring | holes, ac, 0.0)
    silhouette = np.where(holes, 1.0, np.where(mask | ring, ac, 0.0))
    area = float(silhouette.sum())
    if area <= 0:
        return None
    px, py = pixel_grid(y0, y1, x0, x1)
    cx, cy = float((silhouette * px).sum() / area), float((silhouette * py).sum() / area)
    fits = {shape: _fit(shape, silhouette, px, py, cx, cy, area) + (0.0,) for shape in SHAPES}
    ranked = sorted(fits, key=lambda s: fits[s][0])
    if fits[ranked[0]][0] > 0.04 or fits[ranked[1]][0] < 2 * fits[ranked[0]][0]:  # not a clean fit: refine the likeliest
        for shape in ranked[:3]:
            for dilation, soft in _VARIANTS:
                fits[shape] = min(fits[shape], _fit(shape, silhouette, px, py, cx, cy, area, dilation, soft) + (dilation,),
                                  key=lambda f: f[0])
    shape = min(fits, key=lambda s: fits[s][0])
    err, r, d, dilation = fits[shape]
    stroke = max(1.0, STROKE * 2 * r)
    solid = np.clip(0.5 - d, 0.0, 1.0)
    outline_ink = 1 - np.clip(0.5 - (d + stroke), 0.0, 1.0).sum() / max(solid.sum(), 1e-6)
    style = "outline" if ink_map.sum() / area < (1 + outline_ink) / 2 else "filled"
    size = 2 * (r + dilation) / n  # the apparent size, as drawn
    return Seen(shape, COLOR_NAMES[c], cx / n, cy / n, size, style, box(shape, cx / n, cy / n, size), err)


def artifact_measures(image, parsed: Parsed) -> dict:
    """How much of the image the parsed scene does not explain.

    noise: median |image - median3x3(image)| over the canvas (0 for clean renders, grows with grain);
    unexplained: fraction of pixels, away from object edges, that differ from a re-render of the parsed scene by more
    than 48/255 in some channel (ghosts, smudges, fragments, half-done edits).
    """
    img = as_rgb(image).astype(np.float32)
    n = img.shape[0]
    noise = float(np.median(np.abs(img - ndimage.median_filter(img, size=(3, 3, 1))).max(-1)))
    redraw, layers = render_layers(parsed.scene(), n)
    redraw = redraw.astype(np.float32)
    edges = np.zeros((n, n), bool)
    for (y0, y1, x0, x1), cov in layers:  # pixels on or next to a drawn edge are allowed to disagree
        edges[y0:y1, x0:x1] |= (cov > 0.02) & (cov < 0.98)
    edges = ndimage.binary_dilation(edges, structure=_EIGHT, iterations=1)
    off = (np.abs(img - redraw).max(-1) > 48) & ~edges
    return {"noise": noise, "unexplained": float(off.mean())}
