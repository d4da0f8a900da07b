"""Peak host memory per process of the training loop on a real-scale student (DreamLite-0.39B, random weights):
one process, two DDP processes, two FSDP2 processes (``accelerate launch --use_fsdp``), on this CPU.

    python benchmarks/fsdp_memory.py [--model dreamlite-0.39b] [--latent 16] [--steps 2] [--only one,fsdp]

Each run trains ``--steps`` flow-matching steps (the in-context generation objective: target | blank) at batch 1
per process on a small latent, with AdamW and EMA, through ``dreamlite.train.fit``, then writes its checkpoint.
Reported per process: resident memory at the last step (training: weights, gradients, optimizer, EMA; for a
process that does not write the checkpoint, at the end) and the peak over the run (setup, and the checkpoint, which
the main process gathers whole).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

MODES = {"one": [], "ddp": ["--multi_gpu"], "fsdp": ["--use_fsdp", "--fsdp_version", "2"]}


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def rss_gib() -> float:
    """Resident memory now (the peak also holds what setup allocated and freed)."""
    line = next(x for x in open("/proc/self/status") if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 2**20


def worker(model: str, latent: int, steps: int, folder: str) -> None:
    import torch
    import torch.nn as nn

    from dreamlite.compress.distill.flow import flow_noise, flow_timestep, flow_velocity
    from dreamlite.models.conditioning import unet_inputs
    from dreamlite.models.presets import build_preset
    from dreamlite.models.text import TextStates
    import dreamlite.train as train
    from dreamlite.train import TrainSettings, fit

    unet = build_preset(model)
    cfg = unet.config
    text_width = cfg.get("encoder_hid_dim") or cfg["cross_attention_dim"]

    class FlowStep(nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, x0, noise, sigma, states):
            x = flow_noise(x0, noise, sigma)
            text = TextStates(states, states.new_zeros(len(states), 0))
            out = self.unet(torch.cat([x, torch.zeros_like(x)], -1), flow_timestep(sigma),
                            **unet_inputs(cfg, text, 8 * latent, 8 * latent)).sample[..., :latent]
            return (out - flow_velocity(x0, noise)).pow(2).mean(), {}

    procs = int(os.environ.get("WORLD_SIZE", "1"))

    def batches(step: int) -> dict:
        g = torch.Generator().manual_seed(step)
        shape = (procs, cfg["in_channels"], latent, latent)
        return {"x0": torch.randn(shape, generator=g), "noise": torch.randn(shape, generator=g),
                "sigma": torch.rand(procs, generator=g), "states": torch.randn(procs, 16, text_width, generator=g)}

    seen, save = {}, train.save_checkpoint

    def measured_save(*a, **kw):  # the main process (under FSDP every process: they gather together)
        seen["train"] = rss_gib()
        save(*a, **kw)

    train.save_checkpoint = measured_save
    settings = TrainSettings(steps=steps, batch=procs, warmup=0, checkpoint_every=steps, log_every=1)
    fit(FlowStep(), batches, settings, folder, log=lambda line: None)
    print(json.dumps({"rank": int(os.environ.get("RANK", "0")), "train_gib": round(seen.get("train", rss_gib()), 2),
                      "peak_gib": round(peak_gib(), 2)}), flush=True)


def run(mode: str, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        me = [os.path.abspath(__file__), "--worker", "--model", args.model, "--latent", str(args.latent),
              "--steps", str(args.steps), "--folder", folder]
        if mode == "one":
            cmd = [sys.executable, *me]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", *MODES[mode], "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *me]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            raise SystemExit(f"{mode}: failed\n{done.stderr[-3000:]}")
        return sorted((json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"rank"')),
                      key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dreamlite-0.39b")
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--only", default=",".join(MODES))
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--folder")
    args = ap.parse_args()
    if args.worker:
        return worker(args.model, args.latent, args.steps, args.folder)
    print("| launch | process | RSS at the last step (GiB) | peak RSS (GiB) |")
    print("|---|---:|---:|---:|")
    for mode in args.only.split(","):
        for r in run(mode, args):
            print(f"| {mode} | {r['rank']} | {r['train_gib']:.2f} | {r['peak_gib']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
