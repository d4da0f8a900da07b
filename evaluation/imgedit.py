"""ImgEdit-style edit benchmark for the shapes world: records + source images, and the judge over edited images.

``DIR/edits.jsonl`` holds ``{"id", "edit_type", "prompt", "source", "source_scene", "target_scene"}`` with ``source`` a
path relative to DIR (``sources/<id>.png``); ground-truth targets, when rendered, are ``DIR/targets/<id>.png``.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path, PurePosixPath

import numpy as np

from dreamlite.io import DreamliteError, identity_track, inside, load_image, read_jsonl, save_png, write_jsonl
from .shapes import EDIT_TYPES, Scene, SceneError, render, sample_edit
from .shapes.edits import AXES, score_edit
from .shapes.perception import ImageError
from .shapes.perturb import Perturbation, degrade

_KEYS = ("id", "edit_type", "prompt", "source", "source_scene", "target_scene")


def write_edit_bench(out, n_per_type: int, seed: int, render_targets: bool = False, size: int = 64,
                     perturb: Perturbation = Perturbation(), track=identity_track) -> int:
    out = Path(out)
    rng = np.random.default_rng([seed, 1])
    plan = [(t, int(rng.integers(2**31))) for t in EDIT_TYPES for _ in range(n_per_type)]
    rows = []
    for k, (edit_type, eseed) in enumerate(track(plan, len(plan), "edit bench")):
        erng = np.random.default_rng(eseed)
        rec, rid = sample_edit(erng, edit_type), f"{k:05d}"
        rows.append(rec.to_dict(rid, f"sources/{rid}.png"))
        save_png(out / "sources" / f"{rid}.png", render(rec.source, size))
        if render_targets:
            save_png(out / "targets" / f"{rid}.png", degrade(render(rec.target, size), perturb, erng))
    write_jsonl(out / "edits.jsonl", rows)
    return len(rows)


def read_edits(path) -> list[dict]:
    """Edit records with their scenes parsed; errors name the file, line and field."""
    records, seen = [], set()
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(rec, dict):
            raise DreamliteError(f"{where}: expected a JSON object")
        for key in _KEYS:
            if key not in rec:
                raise DreamliteError(f"{where}: missing {key!r}")
        if rec["edit_type"] not in EDIT_TYPES:
            raise DreamliteError(f"{where}: edit_type: unknown edit type {rec['edit_type']!r} "
                                 f"(expected one of {', '.join(EDIT_TYPES)})")
        rid = str(rec["id"])
        if not rid or PurePosixPath(rid).name != rid or rid.startswith("."):
            raise DreamliteError(f"{where}: id: {rid!r} is not a plain file name")
        if rid in seen:
            raise DreamliteError(f"{where}: id: duplicate id {rid!r}")
        seen.add(rid)
        inside(Path(path).parent, rec["source"], f"{where}: source")
        try:
            source = Scene.from_dict(rec["source_scene"], "source_scene")
            target = Scene.from_dict(rec["target_scene"], "target_scene")
        except SceneError as e:
            raise DreamliteError(f"{where}: {e}") from None
        records.append({**rec, "id": rid, "source_scene": source, "target_scene": target})
    if not records:
        raise DreamliteError(f"{path}: no edit records")
    return records


def judge_edit(edits, images, track=identity_track) -> tuple[list[dict], dict]:
    """Score ``images/<id>.png`` against each record. Returns (per-record results, summary)."""
    records, images = read_edits(edits), Path(images)
    if not images.is_dir():
        raise DreamliteError(f"{images}: not a folder")
    results = []
    for rec in track(records, len(records), "judge edit"):
        path = images / f"{rec['id']}.png"
        try:
            score = score_edit(load_image(path), rec["source_scene"], rec["target_scene"])
        except ImageError as e:
            raise DreamliteError(f"{path}: {e}") from None
        results.append({"id": rec["id"], "edit_type": rec["edit_type"], **score.to_dict()})
    return results, summarize_edit(results)


def summarize_edit(results: list[dict]) -> dict:
    by_type: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_type[r["edit_type"]].append(r)
    per_type = {t: {k: float(np.mean([r[k] for r in by_type[t]])) for k in ("overall", *AXES)}
                for t in EDIT_TYPES if t in by_type}
    return {"overall": float(np.mean([v["overall"] for v in per_type.values()])), "per_type": per_type,
            "images": len(results)}
