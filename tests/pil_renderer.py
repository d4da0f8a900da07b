"""A second renderer, independent of dreamlite's: PIL polygons without anti-aliasing, geometry re-derived here from
the written spec (shapes inscribed in the bounding circle, 5-point star, plus sign, outline stroke ~ size/8)."""
import math

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 70),
          "cyan": (40, 200, 220), "blue": (40, 80, 230), "purple": (150, 60, 200), "white": (240, 240, 240)}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128), "navy": (20, 25, 70), "beige": (225, 210, 175)}


def _points(shape, cx, cy, r):
    def polar(n, radius, start):
        return [(cx + radius * math.cos(math.radians(start + 360 * k / n)),
                 cy + radius * math.sin(math.radians(start + 360 * k / n))) for k in range(n)]
    if shape == "square":
        h = r / math.sqrt(2)
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return polar(3, r, -90)
    if shape == "diamond":
        return polar(4, r, -90)
    if shape == "star":
        outer, inner = polar(5, r, -90), polar(5, 0.45 * r, -54)  # a slightly thinner star than dreamlite's
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        t, ln = 0.36 * r, r * math.sqrt(1 - 0.36**2)
        pts = [(t, -ln), (t, -t), (ln, -t), (ln, t), (t, t), (t, ln), (-t, ln), (-t, t), (-ln, t), (-ln, -t), (-t, -t), (-t, -ln)]
        return [(cx + x, cy + y) for x, y in pts]
    raise ValueError(shape)


def _draw(draw, shape, cx, cy, r, fill):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_points(shape, cx, cy, r), fill=fill)


def pil_render(scene: dict, size: int):
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        cx, cy, r = o["cx"] * size - 0.5, o["cy"] * size - 0.5, o["size"] * size / 2
        _draw(draw, o["shape"], cx, cy, r, COLORS[o["color"]])
        if o.get("style") == "outline":  # hollow: the same shape shrunk by the stroke, in background colour
            stroke = max(1.0, size * o["size"] / 8)
            scale = {"circle": 1, "square": 1, "diamond": 1, "triangle": 2, "star": 2.4, "cross": 2.6}[o["shape"]]
            _draw(draw, o["shape"], cx, cy, r - scale * stroke, BACKGROUNDS[scene["background"]])
    return img
