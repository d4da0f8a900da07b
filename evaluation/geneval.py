"""GenEval-format benchmark folders for the shapes world: write prompts (and ground-truth samples), judge samples.

Layout, as GenEval: ``DIR/<00000>/metadata.jsonl`` (one record: tag, include, exclude, prompt) and
``DIR/<00000>/samples/<0000>.png``; ``DIR/evaluation_metadata.jsonl`` lists every prompt in order.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from dreamlite.io import DreamliteError, identity_track, load_image, read_jsonl, save_png, write_jsonl
from .shapes import GEN_TAGS, parse, render, sample_gen_prompt, scene_for, validate_metadata
from .shapes.clauses import MetadataError, judge_parsed
from .shapes.perception import ImageError
from .shapes.perturb import Perturbation, degrade, jitter


def gen_prompts(n_per_tag: int, seed: int):
    """(GenPrompt, its own seed) for ``n_per_tag`` prompts of each of GenEval's six tags, tag by tag."""
    rng = np.random.default_rng([seed, 0])
    return [(sample_gen_prompt(rng, tag), int(rng.integers(2**31))) for tag in GEN_TAGS for _ in range(n_per_tag)]


def write_gen_bench(out, n_per_tag: int, seed: int, render_samples: bool = False, images_per_prompt: int = 4,
                    size: int = 64, perturb: Perturbation = Perturbation(), track=identity_track) -> int:
    """Write the prompts; with ``render_samples`` also ground-truth images (optionally perturbed). Returns #prompts."""
    out = Path(out)
    prompts = gen_prompts(n_per_tag, seed)
    for k, (p, pseed) in enumerate(track(prompts, len(prompts), "gen bench")):
        folder = out / f"{k:05d}"
        write_jsonl(folder / "metadata.jsonl", [p.metadata()])
        if render_samples:
            rng = np.random.default_rng(pseed)
            for s in range(images_per_prompt):
                scene = scene_for(p, rng)
                if perturb.shift:
                    scene = jitter(scene, rng, perturb.shift, size)
                save_png(folder / "samples" / f"{s:04d}.png", degrade(render(scene, size), perturb, rng))
    write_jsonl(out / "evaluation_metadata.jsonl", [p.metadata() for p, _ in prompts])
    return len(prompts)


def _metadata(folder: Path) -> dict:
    path = folder / "metadata.jsonl"
    records = list(read_jsonl(path))
    if len(records) != 1:
        raise DreamliteError(f"{path}: expected one metadata record, found {len(records)}")
    lineno, meta = records[0]
    try:
        return validate_metadata(meta, f"{path}:{lineno}")
    except MetadataError as e:
        raise DreamliteError(str(e)) from None


def judge_gen(root, track=identity_track) -> tuple[list[dict], dict]:
    """Score every ``samples/*.png`` with GenEval's clause logic. Returns (per-image results, summary)."""
    root = Path(root)
    if not root.is_dir():
        raise DreamliteError(f"{root}: not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    if not folders:
        raise DreamliteError(f"{root}: no GenEval prompt folders (00000/metadata.jsonl ...)")
    jobs = [(f, _metadata(f), img) for f in folders for img in sorted((f / "samples").glob("*.png"))]
    if not jobs:
        raise DreamliteError(f"{root}: no samples to judge (expected {folders[0].name}/samples/0000.png ...)")
    results = []
    for folder, meta, path in track(jobs, len(jobs), "judge gen"):
        try:
            parsed = parse(load_image(path))
        except ImageError as e:
            raise DreamliteError(f"{path}: {e}") from None
        correct, reason = judge_parsed(parsed, meta)
        results.append({"folder": folder.name, "filename": path.name, "tag": meta["tag"], "correct": bool(correct),
                        "reason": reason})
    return results, summarize_gen(results)


def summarize_gen(results: list[dict]) -> dict:
    by_tag: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        by_tag[r["tag"]].append(r["correct"])
    order = [t for t in GEN_TAGS if t in by_tag] + sorted(set(by_tag) - set(GEN_TAGS))
    per_tag = {t: float(np.mean(by_tag[t])) for t in order}
    return {"overall": float(np.mean(list(per_tag.values()))), "per_tag": per_tag, "images": len(results)}
