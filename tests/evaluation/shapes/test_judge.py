"""The judge's accuracy bars on small seeded sets (benchmarks/judge_accuracy.py runs the full ones)."""
import numpy as np
import pytest

from dreamlite.evaluation.shapes import EDIT_TYPES, Obj, Scene, parse, render
from dreamlite.evaluation.shapes.perturb import Perturbation, degrade, jitter
from dreamlite.evaluation.shapes.selfcheck import alter_one_clause, edit_bars, gen_accuracy
from pil_renderer import pil_render

N = 20  # prompts per tag


def test_ground_truth_scores_one():
    assert set(gen_accuracy(lambda s, rng: render(s, 64), N).values()) == {1.0}


@pytest.mark.parametrize("perturb", [Perturbation(noise=8), Perturbation(blur=0.7), Perturbation(jpeg=75),
                                     Perturbation(shift=1)], ids=["noise8", "blur0.7", "jpeg75", "shift1"])
def test_perturbed_ground_truth(perturb):
    def make(scene, rng):
        return degrade(render(jitter(scene, rng, perturb.shift, 64), 64), perturb, rng)
    assert min(gen_accuracy(make, N).values()) >= 0.98


@pytest.mark.parametrize("size", [48, 96])
def test_independent_renderer(size):
    assert min(gen_accuracy(lambda s, rng: np.asarray(pil_render(s.to_dict(), size)), N, seed=size).values()) >= 0.98


def test_altered_metadata_is_rejected():
    assert max(gen_accuracy(lambda s, rng: render(s, 64), N, metadata=alter_one_clause).values()) <= 0.02


def test_edit_judge_bars():
    bars = edit_bars(n_per_type=5, seed=1)
    for edit_type in EDIT_TYPES:
        s = bars[edit_type]
        assert min(s["truth_overall"]) >= 4.8, edit_type
        assert max(s["source_compliance"]) <= 1.5, edit_type
        assert max(s["noise40_seamlessness"]) <= 3, edit_type
        assert min(s["moved_compliance"], default=5) >= 4.5 and max(s["moved_preservation"], default=1) <= 3.5
    assert sum(len(s["moved_preservation"]) for s in bars.values()) >= 30


def test_parse_reads_every_attribute():
    scene = Scene("beige", (Obj("triangle", "purple", 0.3, 0.35, 0.3, "outline"), Obj("diamond", "cyan", 0.7, 0.7, 0.2)))
    seen = parse(render(scene, 96))
    assert seen.background == "beige"
    for want, o in zip(scene.objects, sorted(seen.objects, key=lambda o: o.cx)):
        assert (o.shape, o.color, o.style) == (want.shape, want.color, want.style)
        assert o.cx == pytest.approx(want.cx, abs=0.01) and o.size == pytest.approx(want.size, rel=0.05)


def test_noise_is_not_a_scene_even_where_blobs_look_like_objects(rng):
    """An unfinished sampler's speckle has random blobs that parse as objects; the judge refuses the image instead
    of scoring the blobs (perturbed renders stay far below the limit)."""
    from dreamlite.evaluation.shapes.clauses import MAX_UNEXPLAINED, judge_parsed
    from dreamlite.evaluation.shapes.world import sample_gen_prompt, scene_for
    p = sample_gen_prompt(rng, "single_object")
    clean = render(scene_for(p, rng), 64)
    assert parse(clean).unexplained < 0.01 and judge_parsed(parse(clean), p.metadata())[0]
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    noise[20:40, 20:40] = clean[20:40, 20:40]
    parsed = parse(noise)
    correct, reason = judge_parsed(parsed, p.metadata())
    assert parsed.unexplained > MAX_UNEXPLAINED and not correct and reason.startswith("not a clean scene")
