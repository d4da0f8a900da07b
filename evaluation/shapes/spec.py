"""The shapes world's vocabulary and scene records (see docs/shapes-world.md).

A scene is plain data: ``{"background": str, "objects": [{"shape", "color", "cx", "cy", "size", "style"}]}`` with
``cx``, ``cy`` (centre of the bounding circle) and ``size`` (its diameter) as fractions of the canvas.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 70),
    "cyan": (40, 200, 220),
    "blue": (40, 80, 230),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "navy": (20, 25, 70),
    "beige": (225, 210, 175),
}
DEFAULT_BACKGROUND = "black"
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
STYLES: tuple[str, ...] = ("filled", "outline")
PLURALS = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}

MIN_SIZE, MAX_SIZE = 0.18, 0.36  # bounding diameter, fraction of the canvas
SMALL_MAX, LARGE_MIN = 0.24, 0.30  # "small" <= 0.24, "large" >= 0.30
MIN_GAP = 0.04  # free space kept between objects so that no two ever touch, even blurred
STROKE = 0.12  # outline stroke width as a fraction of the object's size (about 1/8)
DEFAULT_CANVAS = 64
MIN_CANVAS, MAX_CANVAS = 32, 256

COLOR_ARRAY = np.array(list(COLORS.values()), dtype=np.float32)  # (8, 3), in COLORS order
COLOR_NAMES = tuple(COLORS)


class SceneError(ValueError):
    """A scene or object record that does not follow the spec; the message names the field."""


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cx: float
    cy: float
    size: float
    style: str = "filled"

    @property
    def ref(self) -> str:
        """How instructions name the object: 'the red circle'."""
        return f"{self.color} {self.shape}"

    def moved(self, cx: float, cy: float) -> "Obj":
        return replace(self, cx=cx, cy=cy)


@dataclass(frozen=True)
class Scene:
    background: str = DEFAULT_BACKGROUND
    objects: tuple[Obj, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [_round(asdict(o)) for o in self.objects]}

    @classmethod
    def from_dict(cls, data: object, where: str = "scene") -> "Scene":
        if not isinstance(data, dict):
            raise SceneError(f"{where}: expected an object with 'background' and 'objects'")
        unknown = set(data) - {"background", "objects"}
        if unknown:
            raise SceneError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        bg = data.get("background", DEFAULT_BACKGROUND)
        if bg not in BACKGROUNDS:
            raise SceneError(f"{where}.background: unknown background {bg!r} (expected one of {', '.join(BACKGROUNDS)})")
        objs = data.get("objects", [])
        if not isinstance(objs, list):
            raise SceneError(f"{where}.objects: expected a list")
        return cls(bg, tuple(obj_from_dict(o, f"{where}.objects[{i}]") for i, o in enumerate(objs)))

    def with_objects(self, objects) -> "Scene":
        return replace(self, objects=tuple(objects))


def _round(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def obj_from_dict(data: object, where: str = "object") -> Obj:
    if not isinstance(data, dict):
        raise SceneError(f"{where}: expected an object")
    unknown = set(data) - {"shape", "color", "cx", "cy", "size", "style"}
    if unknown:
        raise SceneError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    for key in ("shape", "color", "cx", "cy", "size"):
        if key not in data:
            raise SceneError(f"{where}: missing {key!r}")
    check_name(data["shape"], SHAPES, f"{where}.shape", "shape")
    check_name(data["color"], COLORS, f"{where}.color", "colour")
    style = data.get("style", "filled")
    check_name(style, STYLES, f"{where}.style", "style")
    for key in ("cx", "cy", "size"):
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise SceneError(f"{where}.{key}: expected a number in [0, 1], got {value!r}")
    return Obj(data["shape"], data["color"], float(data["cx"]), float(data["cy"]), float(data["size"]), style)


def check_name(value: object, allowed, where: str, what: str) -> str:
    if value not in allowed:
        raise SceneError(f"{where}: unknown {what} {value!r} (expected one of {', '.join(allowed)})")
    return value  # type: ignore[return-value]


def overlaps(a: Obj, b: Obj, gap: float = MIN_GAP) -> bool:
    """Bounding circles closer than ``gap`` (canvas fractions)."""
    return float(np.hypot(a.cx - b.cx, a.cy - b.cy)) < (a.size + b.size) / 2 + gap


def fits(o: Obj, margin: float = 0.02) -> bool:
    r = o.size / 2
    return margin + r <= o.cx <= 1 - margin - r and margin + r <= o.cy <= 1 - margin - r


def placeable(o: Obj, others) -> bool:
    return fits(o) and not any(overlaps(o, p) for p in others)
