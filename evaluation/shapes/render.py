"""Anti-aliased renderer of the shapes world: exact signed distances, coverage = clip(0.5 - d, 0, 1) per pixel."""
from __future__ import annotations

import math

import numpy as np

from .spec import BACKGROUNDS, COLORS, DEFAULT_CANVAS, MAX_CANVAS, MIN_CANVAS, SHAPES, STROKE, Obj, Scene

_STAR_INNER = 0.5  # inner/outer radius of the 5-point star
_CROSS_HALF = 0.38  # half arm thickness of the plus sign, in radii


def _unit_polygons() -> dict[str, np.ndarray]:
    """Vertices of each polygonal shape inscribed in the unit circle, y pointing down."""
    def ring(n, radius, start_deg):
        a = np.deg2rad(start_deg + 360.0 / n * np.arange(n))
        return np.stack([radius * np.cos(a), radius * np.sin(a)], 1)

    star = np.empty((10, 2))
    star[0::2] = ring(5, 1.0, -90)
    star[1::2] = ring(5, _STAR_INNER, -90 + 36)
    t, ln = _CROSS_HALF, math.sqrt(1 - _CROSS_HALF**2)
    cross = np.array([(t, -ln), (t, -t), (ln, -t), (ln, t), (t, t), (t, ln),
                      (-t, ln), (-t, t), (-ln, t), (-ln, -t), (-t, -t), (-t, -ln)])
    h = 1 / math.sqrt(2)
    return {
        "square": np.array([(-h, -h), (h, -h), (h, h), (-h, h)]),
        "triangle": ring(3, 1.0, -90),  # apex up
        "diamond": ring(4, 1.0, -90),
        "star": star,
        "cross": cross,
    }


POLYGONS = _unit_polygons()


def _shoelace(v: np.ndarray) -> float:
    x, y = v[:, 0], v[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


UNIT_AREA = {"circle": math.pi, **{s: _shoelace(v) for s, v in POLYGONS.items()}}
# Half extents (x, y-up, y-down) of each unit shape, for bounding boxes.
UNIT_EXTENT = {"circle": (1.0, 1.0, 1.0),
               **{s: (float(np.abs(v[:, 0]).max()), float(-v[:, 1].min()), float(v[:, 1].max()))
                  for s, v in POLYGONS.items()}}


def signed_distance(shape: str, px: np.ndarray, py: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Signed distance (negative inside) from points to a shape of circumradius ``r`` centred at (cx, cy)."""
    if shape == "circle":
        return np.hypot(px - cx, py - cy) - r
    v = POLYGONS[shape] * r + (cx, cy)
    w = np.roll(v, -1, axis=0)
    e = w - v  # (M, 2) edges
    dx = px[..., None] - v[:, 0]
    dy = py[..., None] - v[:, 1]  # (..., M)
    t = np.clip((dx * e[:, 0] + dy * e[:, 1]) / (e**2).sum(1), 0.0, 1.0)
    dist = np.sqrt(((dx - t * e[:, 0]) ** 2 + (dy - t * e[:, 1]) ** 2).min(-1))
    crosses = (v[:, 1] > py[..., None]) != (w[:, 1] > py[..., None])
    ey = np.where(e[:, 1] == 0, 1.0, e[:, 1])
    x_at = v[:, 0] + (py[..., None] - v[:, 1]) * e[:, 0] / ey
    inside = (crosses & (px[..., None] < x_at)).sum(-1) % 2 == 1
    return np.where(inside, -dist, dist)


def coverage(shape: str, px, py, cx, cy, r, style: str = "filled", stroke: float | None = None) -> np.ndarray:
    """Fraction of each pixel (centres px, py; pixel units) covered by the shape, in [0, 1]."""
    d = signed_distance(shape, px, py, cx, cy, r)
    cov = np.clip(0.5 - d, 0.0, 1.0)
    if style == "outline":
        s = max(1.0, STROKE * 2 * r) if stroke is None else stroke
        cov = cov - np.clip(0.5 - (d + s), 0.0, 1.0)
    return cov


def pixel_grid(y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of the window rows y0:y1, columns x0:x1."""
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    return xs + 0.5, ys + 0.5


def object_window(o: Obj, canvas: int, pad: int = 2) -> tuple[int, int, int, int]:
    r = o.size * canvas / 2
    cx, cy = o.cx * canvas, o.cy * canvas
    y0, y1 = max(0, int(cy - r) - pad), min(canvas, int(math.ceil(cy + r)) + pad)
    x0, x1 = max(0, int(cx - r) - pad), min(canvas, int(math.ceil(cx + r)) + pad)
    return y0, y1, x0, x1


def check_canvas(size: int) -> int:
    if not MIN_CANVAS <= int(size) <= MAX_CANVAS:
        raise ValueError(f"size: canvas must be {MIN_CANVAS}..{MAX_CANVAS} px, got {size}")
    return int(size)


def render_layers(scene: Scene, size: int = DEFAULT_CANVAS):
    """Draw a scene; also return each object's window (y0, y1, x0, x1) and coverage there."""
    size = check_canvas(size)
    img = np.empty((size, size, 3), np.float64)
    img[:] = BACKGROUNDS[scene.background]
    layers = []
    for o in scene.objects:
        y0, y1, x0, x1 = object_window(o, size)
        if y1 <= y0 or x1 <= x0:
            continue
        px, py = pixel_grid(y0, y1, x0, x1)
        cov = coverage(o.shape, px, py, o.cx * size, o.cy * size, o.size * size / 2, o.style)
        win = img[y0:y1, x0:x1]
        win[:] = win * (1 - cov[..., None]) + np.asarray(COLORS[o.color], np.float64) * cov[..., None]
        layers.append(((y0, y1, x0, x1), cov))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), layers


def render(scene: Scene, size: int = DEFAULT_CANVAS) -> np.ndarray:
    """Draw a scene as an (size, size, 3) uint8 RGB image."""
    return render_layers(scene, size)[0]


__all__ = ["render", "coverage", "signed_distance", "UNIT_AREA", "UNIT_EXTENT", "POLYGONS", "SHAPES"]


def box(shape: str, cx: float, cy: float, size: float) -> tuple[float, float, float, float]:
    """Tight bounding box (x0, y0, x1, y1) of a shape, in the units of cx, cy and size."""
    ex, up, down = UNIT_EXTENT[shape]
    r = size / 2
    return cx - ex * r, cy - up * r, cx + ex * r, cy + down * r
