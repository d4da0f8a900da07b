"""Judge accuracy on full sets: ground truth, perturbed renders, an independent renderer, altered metadata, edits.

    python benchmarks/judge_accuracy.py [--n-per-tag 100] [--n-per-type 100] [--json out.json]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the independent PIL renderer lives there

from pil_renderer import pil_render  # noqa: E402

from dreamlite.evaluation.shapes import GEN_TAGS, EDIT_TYPES, render  # noqa: E402
from dreamlite.evaluation.shapes.perturb import Perturbation, degrade, jitter  # noqa: E402
from dreamlite.evaluation.shapes.selfcheck import alter_one_clause, edit_bars, gen_accuracy  # noqa: E402

PERTURBATIONS = {"noise 8/255": Perturbation(noise=8), "blur 0.7 px": Perturbation(blur=0.7),
                 "JPEG q75": Perturbation(jpeg=75), "shift <= 1 px": Perturbation(shift=1),
                 "all four at once": Perturbation(8, 0.7, 75, 1)}


def perturbed(p):
    return lambda scene, rng: degrade(render(jitter(scene, rng, p.shift, 64), 64), p, rng)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-per-tag", type=int, default=100)
    ap.add_argument("--n-per-type", type=int, default=100)
    ap.add_argument("--json")
    args = ap.parse_args()
    n, start = args.n_per_tag, time.perf_counter()
    rows = {"ground truth (64 px)": gen_accuracy(lambda s, rng: render(s, 64), n, seed=1)}
    for name, p in PERTURBATIONS.items():
        rows[f"perturbed: {name}"] = gen_accuracy(perturbed(p), n, seed=2)
    for size in (32, 48, 96):
        rows[f"PIL renderer, no AA ({size} px)"] = gen_accuracy(lambda s, rng: np.asarray(pil_render(s.to_dict(), size)),
                                                               n, seed=size)
    rows["altered metadata (judged correct)"] = gen_accuracy(lambda s, rng: render(s, 64), n, seed=3,
                                                             metadata=alter_one_clause)
    print(f"## Generation judge, {n} prompts per tag, one image each\n")
    print("| condition | " + " | ".join(GEN_TAGS) + " | min |")
    print("|---|" + "---:|" * (len(GEN_TAGS) + 1))
    for name, scores in rows.items():
        print(f"| {name} | " + " | ".join(f"{scores[t]:.2f}" for t in GEN_TAGS) + f" | {min(scores.values()):.2f} |")

    bars = edit_bars(args.n_per_type, seed=4)
    cols = [("truth_overall", min, ">= 4.8"), ("source_compliance", max, "<= 1.5"), ("moved_compliance", min, ">= 4.5"),
            ("moved_preservation", max, "<= 3.5"), ("noise40_seamlessness", max, "<= 3")]
    print(f"\n## Edit judge, {args.n_per_type} edits per type (worst case over the set; bar in the header)\n")
    print("| type | " + " | ".join(f"{c} ({f.__name__} {bar})" for c, f, bar in cols) + " | moved n |")
    print("|---|" + "---:|" * (len(cols) + 1))
    for t in EDIT_TYPES:
        s = bars[t]
        cells = [f"{f(s[c]):.2f}" if s[c] else "-" for c, f, _ in cols]
        print(f"| {t} | " + " | ".join(cells) + f" | {len(s['moved_preservation'])} |")
    print(f"\n({time.perf_counter() - start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"gen": rows, "edit": {t: dict(v) for t, v in bars.items()}}, indent=1))


if __name__ == "__main__":
    main()
