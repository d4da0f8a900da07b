"""Recovery training throughput (samples/s) on this CPU, per phase kind (distilled text-to-image, editing, joint), with
the batches drawn in the training loop (``workers: 0``) and by a DataLoader worker while the step trains
(``workers: 1``).

    python benchmarks/recover_speed.py [--student MODEL_FOLDER] [--batch 32] [--steps 30] [--workers 0,1]

The student is the shipped teacher pruned to shapes-mobile (2 calibration batches, into a temporary folder) unless
``--student`` names a pruned model; the teacher is ``zoo:shapes-server``. Each cell trains ``--steps`` optimizer
steps after ``--warmup`` untimed ones, from the same weights, in a fresh folder. Prints a markdown table; ``--json``
writes it as JSON too. Run it alone: on 2 cores anything else running halves the figures.
"""
import argparse
import json
import tempfile
import time

import torch

from dreamlite.compress.distill import Phase, recover
from dreamlite.compress.prune.target import prune_to_target
from dreamlite.data import ShapesData
from dreamlite.models.bundle import load_bundle
from dreamlite.train import TrainSettings


def rate(student, teacher, task: str, batch: int, steps: int, warmup: int, workers: int) -> float:
    """Samples/s over ``steps`` optimizer steps, after ``warmup`` untimed steps (a fresh training folder each)."""
    times = []

    def timed_log(message: str) -> None:  # fit logs at the end of the warmup, every ``warmup`` steps, and at the end
        if message.lstrip().startswith("step "):
            times.append(time.perf_counter())

    train = TrainSettings(steps=warmup + steps, batch=batch, lr=1e-4, warmup=0, ema=0, workers=workers,
                          checkpoint_every=10**6, log_every=warmup)
    state = {k: v.clone() for k, v in student.unet.state_dict().items()}
    with tempfile.TemporaryDirectory() as folder:
        recover(student, teacher, [Phase(task=task, train=train)], folder, ShapesData(student.image_size),
                log=timed_log)
    student.unet.load_state_dict(state)  # every measurement starts from the same weights
    return batch * steps / (times[-1] - times[0])  # the logs at the end of the warmup and of the last step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", help="a pruned student's model folder (default: prune the teacher here)")
    ap.add_argument("--teacher", default="zoo:shapes-server")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", default="0,1")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as pruned:
        if args.student is None:
            prune_to_target(args.teacher, "shapes-mobile", pruned, calib=2)
        student = load_bundle(args.student or pruned)
    teacher = load_bundle(args.teacher)
    workers = [int(w) for w in args.workers.split(",")]
    print(f"torch threads: {torch.get_num_threads()}; batch {args.batch}; {args.steps} timed steps per cell")
    print("| phase | " + " | ".join(f"workers {w}" for w in workers) + " |")
    print("|---|" + "---:|" * len(workers))
    table = {}
    for task in ("t2i", "edit", "joint"):
        table[task] = {w: rate(student, teacher, task, args.batch, args.steps, args.warmup, w) for w in workers}
        print(f"| {task} | " + " | ".join(f"{table[task][w]:.1f} samples/s" for w in workers) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "steps": args.steps, "samples_per_s": table}, f, indent=1)


if __name__ == "__main__":
    main()
