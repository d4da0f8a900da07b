"""shapes teacher -> shapes-mobile with each importance criterion: the pruned-but-untrained student's denoising loss
on held-out data (the teacher's epsilon objective, unweighted, timesteps spread over the schedule), its output
deviation from the teacher, and its GenEval-style score; the teacher's own loss and score for reference. With
``--recover-steps N``, also what the inherited weights are worth: each student then trains N distilled
text-to-image steps (same batches for every criterion) and its held-out flow loss is measured
(``compress/distill/heldout.py``).

    python benchmarks/prune_criteria.py [--teacher zoo:shapes-server] [--n-per-tag 10] [--calib 4] \
        [--recover-steps 300] [--json out.json]

Held-out batches use a seed no calibration batch uses. The student samples as its teacher does (epsilon, DDIM, the
teacher's schedule and guidance), generating beside a blank (its in-context width).
"""
import argparse
import json
import tempfile
from pathlib import Path

import torch

from dreamlite.compress.distill import Phase, recover
from dreamlite.compress.distill.heldout import held_out_losses
from dreamlite.compress.prune.importance import CRITERIA
from dreamlite.compress.prune.passes import WidthPass
from dreamlite.compress.prune.target import calibration_batches, prune_to_target, unet_call
from dreamlite.data import ShapesData
from dreamlite.evaluation.model_bench import bench_gen
from dreamlite.models.bundle import load_bundle
from dreamlite.models.presets import build
from dreamlite.models.sampler import default_settings
from dreamlite.train import TrainSettings

HELD_OUT_SEED = 987_654


@torch.no_grad()
def denoising_loss(bundle, batches) -> float:
    total = 0.0
    for b in batches:
        out = bundle.unet(**unet_call(bundle.unet, b, bundle.in_context)).sample[..., :b["noise"].shape[-1]]
        total += float((out - b["noise"]).pow(2).mean())
    return total / len(batches)


def score(bundle, n_per_tag: int, seed: int, folder: Path) -> dict:
    if not n_per_tag:
        return {}
    s = default_settings(bundle)
    s.seed = seed
    summary = bench_gen(bundle, folder, n_per_tag, 1, s, seed)
    return {"overall": round(summary["overall"], 3), "per_tag": {k: round(v, 2) for k, v in summary["per_tag"].items()}}


def recovered_loss(student, teacher, steps: int, folder: Path) -> float:
    """Held-out text-to-image flow loss after ``steps`` distilled text-to-image steps (batch 16, lr 1e-3)."""
    torch.manual_seed(0)
    train = TrainSettings(steps=steps, batch=16, lr=1e-3, warmup=steps // 10, checkpoint_every=steps, log_every=steps)
    recover(student, teacher, [Phase(task="t2i", train=train)], folder, ShapesData(student.image_size), seed=0,
            log=lambda *_: None)
    return held_out_losses(student, ShapesData(student.image_size))["t2i"]["mean"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="zoo:shapes-server")
    ap.add_argument("--target", default="shapes-mobile")
    ap.add_argument("--n-per-tag", type=int, default=10)
    ap.add_argument("--calib", type=int, default=4)
    ap.add_argument("--held-out", type=int, default=8, help="held-out batches of 8 for the denoising loss")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--random-seeds", type=int, default=4,
                    help="random-criterion draws, on the same calibration batches (the control's spread)")
    ap.add_argument("--recover-steps", type=int, default=0, help="distilled text-to-image steps before a second "
                    "held-out loss (0: none)")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    teacher = load_bundle(a.teacher)
    teacher.unet.float().eval()
    held_out = calibration_batches(teacher, a.held_out, HELD_OUT_SEED)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows["teacher"] = {"loss": round(denoising_loss(teacher, held_out), 4),
                           **score(teacher, a.n_per_tag, a.seed, Path(tmp) / "teacher")}
        print("teacher", rows["teacher"], flush=True)
        runs = [(c, c, 0) for c in CRITERIA if c != "random"]
        runs += [(f"random (seed {k})", "random", k) for k in range(a.random_seeds)]
        for row, c, seed in runs:
            folder = Path(tmp) / f"{c}-{seed}"
            report = prune_to_target(a.teacher, a.target, folder, c, a.calib, passes=[WidthPass(seed=seed)])
            student = load_bundle(str(folder))
            rows[row] = {"loss": round(denoising_loss(student, held_out), 4),
                         "deviation": report["relative_output_deviation"],
                         **score(student, a.n_per_tag, a.seed, Path(tmp) / f"{c}-{seed}-bench")}
            if a.recover_steps:
                rows[row]["recovered_t2i_loss"] = round(recovered_loss(student, teacher, a.recover_steps,
                                                                       Path(tmp) / f"{c}-{seed}-train"), 4)
            print(row, rows[row], flush=True)
        rows["random-init"] = {"deviation": report["relative_output_deviation_random_init"]}
        if a.recover_steps:  # the same architecture from random weights: what inheriting is worth at all
            fresh = load_bundle(str(folder))
            fresh.unet = build(dict(fresh.unet.config), type(fresh.unet).__name__, seed=0)
            rows["random-init"]["recovered_t2i_loss"] = round(
                recovered_loss(fresh, teacher, a.recover_steps, Path(tmp) / "random-init-train"), 4)
        print("random-init", rows["random-init"], flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
