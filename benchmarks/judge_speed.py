"""Judge throughput on one core: images per second for generation (parse + clauses) and edits (parse + artifacts +
scores), 64 px by default.

    python benchmarks/judge_speed.py [--size 64] [--n 600]
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, before numpy loads
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from dreamlite.evaluation.shapes import GEN_TAGS, EDIT_TYPES, evaluate, parse, render, sample_edit, sample_gen_prompt, scene_for  # noqa: E402,E501
from dreamlite.evaluation.shapes.edits import score_edit  # noqa: E402


def rate(fn, items, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return len(items) / best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n", type=int, default=600)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    rng = np.random.default_rng(0)
    prompts = [sample_gen_prompt(rng, GEN_TAGS[i % 6]) for i in range(args.n)]
    gen = [(render(scene_for(p, rng), args.size), p.metadata()) for p in prompts]
    edits = [sample_edit(rng, EDIT_TYPES[i % 9]) for i in range(args.n // 2)]
    edit_items = [(render(r.target, args.size), r) for r in edits]
    g = rate(lambda it: evaluate(parse(it[0]).objects, it[1]), gen)
    e = rate(lambda it: score_edit(it[0], it[1].source, it[1].target), edit_items)
    print(f"judge gen : {g:7.1f} images/s  ({args.size} px, one core, {len(gen)} images, best of 3)")
    print(f"judge edit: {e:7.1f} images/s  ({args.size} px, one core, {len(edit_items)} images, best of 3)")


if __name__ == "__main__":
    main()
