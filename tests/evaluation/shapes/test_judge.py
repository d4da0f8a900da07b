"""The judge's accuracy bars on small seeded sets (benchmarks/judge_accuracy.py runs the full ones)."""
import copy

import numpy as np
import pytest

from dreamlite.evaluation.shapes import EDIT_TYPES, GEN_TAGS, evaluate, parse, render, sample_edit, sample_gen_prompt, scene_for
from dreamlite.evaluation.shapes.edits import score_edit
from dreamlite.evaluation.shapes.match import diff
from dreamlite.evaluation.shapes.perturb import Perturbation, degrade, jitter
from dreamlite.evaluation.shapes.spec import COLORS, SHAPES, placeable
from pil_renderer import pil_render

N = 20  # prompts per tag


def gen_accuracy(make_image, metadata=lambda p, rng: p.metadata(), seed=0):
    rng = np.random.default_rng(seed)
    scores = {}
    for tag in GEN_TAGS:
        ok = []
        for _ in range(N):
            p = sample_gen_prompt(rng, tag)
            ok.append(evaluate(parse(make_image(scene_for(p, rng), rng)).objects, metadata(p, rng))[0])
        scores[tag] = float(np.mean(ok))
    return scores


def test_ground_truth_scores_one():
    assert set(gen_accuracy(lambda s, rng: render(s, 64)).values()) == {1.0}


@pytest.mark.parametrize("perturb", [Perturbation(noise=8), Perturbation(blur=0.7), Perturbation(jpeg=75),
                                     Perturbation(shift=1)], ids=["noise8", "blur0.7", "jpeg75", "shift1"])
def test_perturbed_ground_truth(perturb):
    def make(scene, rng):
        return degrade(render(jitter(scene, rng, perturb.shift, 64), 64), perturb, rng)
    assert min(gen_accuracy(make).values()) >= 0.98


@pytest.mark.parametrize("size", [48, 96])
def test_independent_renderer(size):
    assert min(gen_accuracy(lambda s, rng: np.asarray(pil_render(s.to_dict(), size)), seed=size).values()) >= 0.98


def alter_one_clause(p, rng):
    """The metadata with one clause made false for the true scene: other colour, count +-1, flipped relation or
    another shape."""
    meta = copy.deepcopy(p.metadata())
    inc = meta["include"]
    present = {c["class"] for c in inc}
    if p.tag == "position":
        flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        inc[1]["position"][0] = flip[inc[1]["position"][0]]
    elif p.tag in ("colors", "color_attr"):
        clause = inc[int(rng.integers(len(inc)))]
        clause["color"] = next(c for c in COLORS if c not in {x.get("color") for x in inc})
    elif p.tag == "counting":
        n = inc[0]["count"] + (1 if rng.random() < 0.5 else -1)
        inc[0]["count"], meta["exclude"][0]["count"] = n, n + 1
    else:
        inc[int(rng.integers(len(inc)))]["class"] = next(s for s in SHAPES if s not in present)
    return meta


def test_altered_metadata_is_rejected():
    assert max(gen_accuracy(lambda s, rng: render(s, 64), metadata=alter_one_clause).values()) <= 0.02


@pytest.mark.parametrize("edit_type", EDIT_TYPES)
def test_edit_judge_bars(edit_type):
    rng = np.random.default_rng(hash(edit_type) % 2**32)
    moved = 0
    for _ in range(6):
        rec = sample_edit(rng, edit_type)
        assert score_edit(render(rec.target, 64), rec.source, rec.target).overall >= 4.8
        assert score_edit(render(rec.source, 64), rec.source, rec.target).compliance <= 1.5
        noisy = degrade(render(rec.target, 64), Perturbation(noise=40), rng)
        assert score_edit(noisy, rec.source, rec.target).seamlessness <= 3
        untouched = diff(rec.source, rec.target).untouched
        if not untouched:
            continue
        j = untouched[0][1]
        o, others = rec.target.objects[j], [x for k, x in enumerate(rec.target.objects) if k != j]
        for angle in np.linspace(0, 2 * np.pi, 16, endpoint=False):
            shifted = o.moved(o.cx + 0.15 * np.cos(angle), o.cy + 0.15 * np.sin(angle))
            if placeable(shifted, others):
                s = score_edit(render(rec.target.with_objects([*others, shifted]), 64), rec.source, rec.target)
                assert s.compliance >= 4.5 and s.preservation <= 3.5
                moved += 1
                break
    assert moved >= 1 or edit_type == "extract"


def test_parse_reads_every_attribute():
    from dreamlite.evaluation.shapes import Obj, Scene
    scene = Scene("beige", (Obj("triangle", "purple", 0.3, 0.35, 0.3, "outline"), Obj("diamond", "cyan", 0.7, 0.7, 0.2)))
    seen = parse(render(scene, 96))
    assert seen.background == "beige"
    got = sorted(seen.objects, key=lambda o: o.cx)
    for want, o in zip(scene.objects, got):
        assert (o.shape, o.color, o.style) == (want.shape, want.color, want.style)
        assert o.cx == pytest.approx(want.cx, abs=0.01) and o.size == pytest.approx(want.size, rel=0.05)
