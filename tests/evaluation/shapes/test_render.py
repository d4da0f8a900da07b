import pytest

from dreamlite.evaluation.shapes import BACKGROUNDS, COLORS, SHAPES, Obj, Scene, SceneError, render
from dreamlite.evaluation.shapes.render import UNIT_AREA


@pytest.mark.parametrize("shape", SHAPES)
def test_drawn_area_matches_geometry(shape):
    n, size = 128, 0.3
    img = render(Scene("black", (Obj(shape, "white", 0.5, 0.5, size),)), n)
    ink = img[..., 0].astype(float).sum() / 240
    expected = UNIT_AREA[shape] * (size * n / 2) ** 2
    assert ink == pytest.approx(expected, rel=0.02)


def test_outline_leaves_a_hole_and_background_shows():
    img = render(Scene("gray", (Obj("circle", "red", 0.5, 0.5, 0.3, "outline"),)), 64)
    assert tuple(img[32, 32]) == BACKGROUNDS["gray"]
    assert tuple(img[0, 0]) == BACKGROUNDS["gray"]
    assert tuple(img[32, 32 - 9]) == COLORS["red"]  # on the ring (radius 9.6 px, stroke 2.3 px)


def test_canvas_limits():
    scene = Scene("black", (Obj("star", "blue", 0.5, 0.5, 0.3),))
    assert render(scene, 32).shape == (32, 32, 3) and render(scene, 256).shape == (256, 256, 3)
    with pytest.raises(ValueError, match="size"):
        render(scene, 16)


def test_scene_records_name_the_bad_field():
    with pytest.raises(SceneError, match=r"objects\[0\]\.shape: unknown shape 'hexagon'"):
        Scene.from_dict({"background": "black", "objects": [{"shape": "hexagon", "color": "red", "cx": .5, "cy": .5,
                                                             "size": .2}]})
    with pytest.raises(SceneError, match=r"background: unknown background 'pink'"):
        Scene.from_dict({"background": "pink", "objects": []})
    rec = {"background": "navy", "objects": [{"shape": "cross", "color": "cyan", "cx": .3, "cy": .6, "size": .25,
                                             "style": "outline"}]}
    assert Scene.from_dict(rec).to_dict() == rec
