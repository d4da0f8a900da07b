"""Benchmark a model: sample every prompt (or edit every source) of a fresh seeded benchmark, then judge it.

Generation writes GenEval's folder layout with the model's samples; editing writes ImgEdit-style records, the
sources and the model's outputs. Both leave ``summary.json`` and ``results.jsonl`` beside the images, so the same
folder can be re-judged (``dreamlite judge``) or scored by the original benchmark code for real models.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from dreamlite.io import identity_track, load_image, save_png, write_json, write_jsonl
from .geneval import gen_prompts, judge_gen, write_gen_bench
from .imgedit import judge_edit, read_edits, write_edit_bench
from .preview import edit_sheet, gen_sheet


def _batches(items: list, size: int):
    for k in range(0, len(items), size):
        yield k, items[k:k + size]


def _sampler_summary(bundle, settings, seed: int) -> dict:
    """How a bench sampled: the scheduler (flow models always use flow-matching Euler), steps, guidance, seed."""
    scheduler = "flow-euler" if bundle.prediction == "flow" else settings.scheduler
    return {"scheduler": scheduler, "steps": settings.steps, "cfg": settings.cfg, "flow_shift": settings.flow_shift,
            "seed": seed}


def bench_gen(bundle, out, n_per_tag: int, images_per_prompt: int, settings, seed: int,
              track=identity_track) -> dict:
    """Sample ``n_per_tag`` prompts per GenEval tag, ``images_per_prompt`` each, into ``out``; judge; summary."""
    from dreamlite.models.sampler import generate

    out = Path(out)
    write_gen_bench(out, n_per_tag, seed, images_per_prompt=images_per_prompt)
    jobs = [(k, s, p.prompt) for k, (p, _) in enumerate(gen_prompts(n_per_tag, seed)) for s in range(images_per_prompt)]
    start = time.perf_counter()
    batches = list(_batches(jobs, settings.batch))
    for first, chunk in track(batches, len(batches), "sample"):
        images = generate(bundle, [p for _, _, p in chunk], settings, first_index=first)
        for (k, s, _), image in zip(chunk, images):
            save_png(out / f"{k:05d}" / "samples" / f"{s:04d}.png", image)
    seconds = time.perf_counter() - start
    results, summary = judge_gen(out, track)
    prompts = {f"{k:05d}": p.prompt for k, (p, _) in enumerate(gen_prompts(n_per_tag, seed))}
    gen_sheet(out, results, prompts).save(out / "grid.png")
    summary |= _sampler_summary(bundle, settings, seed) | {"images_per_s": round(len(jobs) / seconds, 2)}
    write_jsonl(out / "results.jsonl", results)
    write_json(out / "summary.json", summary)
    return summary


def bench_edit(bundle, out, n_per_type: int, settings, seed: int, track=identity_track) -> dict:
    """Edit ``n_per_type`` sources per ImgEdit type into ``out/edited/<id>.png``; judge; summary."""
    from dreamlite.models.sampler import edit

    out = Path(out)
    write_edit_bench(out, n_per_type, seed, size=bundle.image_size)
    records = read_edits(out / "edits.jsonl")
    start = time.perf_counter()
    batches = list(_batches(records, settings.batch))
    for first, chunk in track(batches, len(batches), "edit"):
        sources = np.stack([load_image(out / r["source"]) for r in chunk])
        images = edit(bundle, sources, [r["prompt"] for r in chunk], settings, first_index=first)
        for r, image in zip(chunk, images):
            save_png(out / "edited" / f"{r['id']}.png", image)
    seconds = time.perf_counter() - start
    results, summary = judge_edit(out / "edits.jsonl", out / "edited", track)
    edit_sheet(out, results, {r["id"]: r for r in records}).save(out / "grid.png")
    summary |= _sampler_summary(bundle, settings, seed) | {"image_cfg": settings.image_cfg,
                                                           "images_per_s": round(len(records) / seconds, 2)}
    write_jsonl(out / "results.jsonl", results)
    write_json(out / "summary.json", summary)
    return summary
