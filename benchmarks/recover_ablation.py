"""Recovery ablation at equal steps (issue 5): task-progressive (t2i -> edit -> joint) versus joint from the start
versus editing without the text-to-image stage, and progressive without each distillation loss; ``t2i-only``
compares student layouts on the text-to-image phase alone (``--student`` pruned to each layout). Every variant
starts from the same pruned student, trains the same number of optimizer steps on the same batch size, and is
judged on the same fresh GenEval-style and ImgEdit-style benchmarks, and measured on the same held-out samples
(``compress/distill/heldout.py``: flow losses at fixed sigmas, and how much the student reads the source).

    dreamlite prune --teacher zoo:shapes-server --target shapes-mobile --calib 4 --out runs/ablation/student
    python benchmarks/recover_ablation.py --student runs/ablation/student --teacher zoo:shapes-server \
        --steps 900 --batch 16 --lr 1e-3 --n 10 --out runs/ablation [--only progressive,joint-only]

Writes OUT/results.json and OUT/results.md (the table pasted into docs/recovery.md); each variant's training folder
is kept under OUT/<variant>/train, so an interrupted run resumes where it stopped, and its model under
OUT/<variant>/model.
"""
import argparse
import json
from pathlib import Path

import torch

from dreamlite.compress.distill import LossWeights, Phase, recover
from dreamlite.compress.distill.heldout import held_out_losses
from dreamlite.data import ShapesData
from dreamlite.evaluation.model_bench import bench_edit, bench_gen
from dreamlite.models.bundle import load_bundle
from dreamlite.models.sampler import default_settings
from dreamlite.train import TrainSettings

NO_OUTPUT, NO_FEATURE, NO_KD = LossWeights(output=0), LossWeights(feature=0), LossWeights(output=0, feature=0)
# variant -> [(task, share of the steps, loss weights)]
VARIANTS = {
    "progressive": [("t2i", 1 / 3, None), ("edit", 1 / 3, None), ("joint", 1 / 3, None)],
    "t2i-only": [("t2i", 1.0, None)],
    "joint-only": [("joint", 1.0, None)],
    "no-t2i-stage": [("edit", 1 / 2, None), ("joint", 1 / 2, None)],
    "progressive-no-output-kd": [("t2i", 1 / 3, NO_OUTPUT), ("edit", 1 / 3, NO_OUTPUT), ("joint", 1 / 3, NO_OUTPUT)],
    "progressive-no-feature-kd": [("t2i", 1 / 3, NO_FEATURE), ("edit", 1 / 3, NO_FEATURE),
                                  ("joint", 1 / 3, NO_FEATURE)],
    "progressive-no-kd": [("t2i", 1 / 3, NO_KD), ("edit", 1 / 3, NO_KD), ("joint", 1 / 3, NO_KD)],
}


def phases(plan, steps: int, batch: int, lr: float) -> list[Phase]:
    out, left = [], steps
    for i, (task, share, weights) in enumerate(plan):
        n = left if i == len(plan) - 1 else round(steps * share)
        left -= n
        train = TrainSettings(steps=n, batch=batch, lr=lr, warmup=min(100, n // 10), checkpoint_every=250)
        out.append(Phase(task=task, train=train, **({"weights": weights} if weights else {})))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", required=True, help="the pruned student (a prune stage's model/ folder)")
    ap.add_argument("--teacher", default="zoo:shapes-server")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--n", type=int, default=20, help="prompts per tag and edits per type")
    ap.add_argument("--seed", type=int, default=31)
    ap.add_argument("--sigma-sampling", choices=["logit-normal", "uniform"], default="logit-normal")
    ap.add_argument("--shift", type=float, default=1.0, help="training sigma shift (> 1: more high-noise steps)")
    ap.add_argument("--edit-shift", type=float, help="editing samples' sigma shift (default: --shift)")
    ap.add_argument("--only", help="comma-separated variants")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = Path(a.out)
    names = a.only.split(",") if a.only else list(VARIANTS)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    teacher = load_bundle(a.teacher)
    if "pruned" not in results:  # the common starting point, before any training (held-out losses only)
        results["pruned"] = {k: v["mean"] for k, v in held_out_losses(load_bundle(a.student),
                                                                      ShapesData(teacher.image_size)).items()}
    for name in names:
        if name in results:
            continue
        student = load_bundle(a.student)
        torch.manual_seed(0)
        train = recover(student, teacher, phases(VARIANTS[name], a.steps, a.batch, a.lr), out / name / "train",
                        ShapesData(student.image_size), seed=0, sigma_sampling=a.sigma_sampling, shift=a.shift,
                        edit_shift=a.edit_shift)
        losses = held_out_losses(student, ShapesData(student.image_size))
        student.prediction = "flow"
        student.save_pretrained(out / name / "model", stage="recover", parent=a.student, variant=name)
        s = default_settings(student)
        s.seed = a.seed
        gen = bench_gen(student, out / name / "gen", a.n, 1, s, a.seed)
        edit = bench_edit(student, out / name / "edit", a.n, s, a.seed)
        results[name] = {"gen": round(gen["overall"], 3), "edit": round(edit["overall"], 2),
                         "edit_min_type": round(min(v["overall"] for v in edit["per_type"].values()), 2),
                         "held_out_t2i": losses["t2i"]["mean"], "held_out_edit": losses["edit"]["mean"],
                         "source_gain": losses["source_gain"]["mean"],
                         "source_gain_at_1": losses["source_gain"]["per_sigma"]["1.0"],
                         "edit_at_1": losses["edit"]["per_sigma"]["1.0"], "final_loss": train[-1]["final_loss"],
                         "held_out": losses}
        print(name, results[name], flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    p = results["pruned"]
    lines = [f"Equal steps: {a.steps} x batch {a.batch}, lr {a.lr}, {a.sigma_sampling} sigmas, shift {a.shift}, "
             f"editing shift {a.shift if a.edit_shift is None else a.edit_shift}; "
             f"{a.n} prompts per tag, {a.n} edits per type, seed "
             f"{a.seed}. Held-out losses of the pruned student before training: t2i {p['t2i']:.4f}, edit "
             f"{p['edit']:.4f}, source gain {p['source_gain']:.4f}; copying the source at sigma 1: "
             f"{p.get('copy_source', float('nan')):.4f}.",
             "", "| variant | GenEval-style | ImgEdit-style | worst edit type | held-out t2i loss | held-out edit loss "
             "| source gain | source gain at sigma 1 | edit loss at sigma 1 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v['gen']:.3f} | {v['edit']:.2f} | {v['edit_min_type']:.2f} | {v['held_out_t2i']:.4f} "
              f"| {v['held_out_edit']:.4f} | {v['source_gain']:.4f} | {v.get('source_gain_at_1', float('nan')):.4f} "
              f"| {v.get('edit_at_1', float('nan')):.4f} |" for k, v in results.items() if k != "pruned"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
