"""The judge checked against ground truth: accuracy on renders (clean, perturbed, another renderer), on metadata made
false by one clause, and the edit judge's bars. Used by the tests (small sets) and benchmarks/judge_accuracy.py."""
from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np

from .clauses import judge_parsed
from .edits import score_edit
from .match import diff
from .perception import parse
from .perturb import Perturbation, degrade
from .render import render
from .spec import COLORS, SHAPES, placeable
from .world import EDIT_TYPES, GEN_TAGS, sample_edit, sample_gen_prompt, scene_for

FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def gen_accuracy(make_image, n_per_tag: int, seed: int = 0, metadata=None) -> dict[str, float]:
    """Per-tag fraction judged correct; ``make_image(scene, rng)`` draws the true scene, ``metadata(prompt, rng)``
    gives the record to judge against (the prompt's own by default)."""
    rng = np.random.default_rng(seed)
    scores = {}
    for tag in GEN_TAGS:
        ok = []
        for _ in range(n_per_tag):
            p = sample_gen_prompt(rng, tag)
            image = make_image(scene_for(p, rng), rng)
            meta = metadata(p, rng) if metadata else p.metadata()
            ok.append(judge_parsed(parse(image), meta)[0])
        scores[tag] = float(np.mean(ok))
    return scores


def alter_one_clause(p, rng) -> dict:
    """The prompt's metadata with one clause made false for its true scene: another colour, count +-1, the flipped
    relation, or a shape that is not there."""
    meta = copy.deepcopy(p.metadata())
    inc = meta["include"]
    if p.tag == "position":
        inc[1]["position"][0] = FLIP[inc[1]["position"][0]]
    elif p.tag in ("colors", "color_attr"):
        inc[int(rng.integers(len(inc)))]["color"] = next(c for c in COLORS if c not in {x.get("color") for x in inc})
    elif p.tag == "counting":
        n = inc[0]["count"] + (1 if rng.random() < 0.5 else -1)
        inc[0]["count"], meta["exclude"][0]["count"] = n, n + 1
    else:
        inc[int(rng.integers(len(inc)))]["class"] = next(s for s in SHAPES if s not in {c["class"] for c in inc})
    return meta


def _move_untouched(rec, distance: float = 0.15):
    """The target scene with one object the edit did not touch moved by ``distance``; None if none can move."""
    for _, j in diff(rec.source, rec.target).untouched:
        o, others = rec.target.objects[j], [x for k, x in enumerate(rec.target.objects) if k != j]
        for angle in np.linspace(0, 2 * np.pi, 16, endpoint=False):
            moved = o.moved(o.cx + distance * np.cos(angle), o.cy + distance * np.sin(angle))
            if placeable(moved, others):
                return rec.target.with_objects([*others, moved])
    return None


def edit_bars(n_per_type: int, seed: int = 0, size: int = 64) -> dict[str, dict[str, list[float]]]:
    """Per edit type, the scores behind the edit judge's bars: truth overall, unchanged-source compliance,
    moved-object compliance and preservation, heavy-noise (sigma 40/255) seamlessness."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, list[float]]] = {t: defaultdict(list) for t in EDIT_TYPES}
    for edit_type in EDIT_TYPES:
        s = out[edit_type]
        for _ in range(n_per_type):
            rec = sample_edit(rng, edit_type)
            s["truth_overall"].append(score_edit(render(rec.target, size), rec.source, rec.target).overall)
            s["source_compliance"].append(score_edit(render(rec.source, size), rec.source, rec.target).compliance)
            noisy = degrade(render(rec.target, size), Perturbation(noise=40), rng)
            s["noise40_seamlessness"].append(score_edit(noisy, rec.source, rec.target).seamlessness)
            moved = _move_untouched(rec)
            if moved is not None:
                score = score_edit(render(moved, size), rec.source, rec.target)
                s["moved_compliance"].append(score.compliance)
                s["moved_preservation"].append(score.preservation)
    return out
