"""Where an epsilon teacher is weak along its schedule: its epsilon MSE at fixed timesteps on held-out rendered
batches (captions kept, plain Gaussian noise as at sampling), beside the trivial predictor eps = x_t / sqrt(1 - a)
(the clean image taken as 0): an epsilon error above the trivial one is where DDIM starts from a worse guess than grey.

    python benchmarks/teacher_error.py [--model zoo:shapes-server ...] [--batches 8 --batch 40 --seed 777]
"""
import argparse

import torch
from diffusers import DDPMScheduler

from dreamlite.models.bundle import load_bundle
from dreamlite.models.conditioning import unet_inputs
from dreamlite.models.teacher import SCHEDULES, t2i_batch

TIMESTEPS = (999, 900, 700, 500, 300, 100)


@torch.no_grad()
def epsilon_errors(spec: str, batches: int, batch: int, seed: int) -> dict[int, tuple[float, float]]:
    """{timestep: (model MSE, trivial MSE)} over ``batches`` held-out batches of ``batch`` images."""
    bundle = load_bundle(spec)
    unet = bundle.unet.float().eval()
    schedule = DDPMScheduler.from_config(SCHEDULES[bundle.schedule])
    latent = (unet.config.in_channels, bundle.latent_size(), bundle.latent_size())
    sums = {t: [0.0, 0.0] for t in TIMESTEPS}
    for i in range(batches):
        b = t2i_batch(seed, i, batch, latent, caption_dropout=0.0, size=bundle.image_size)
        x0, noise = bundle.codec.encode(b["images"]), b["noise"]
        text = bundle.text.encode(b["captions"])
        extra = unet_inputs(unet.config, text, bundle.image_size, bundle.image_size)
        for t in TIMESTEPS:
            ts = torch.full((batch,), t)
            noisy = schedule.add_noise(x0, noise, ts)
            pred = unet(noisy, ts, **extra).sample
            trivial = noisy / (1 - schedule.alphas_cumprod[t]).sqrt()
            sums[t][0] += (pred - noise).pow(2).mean().item() / batches
            sums[t][1] += (trivial - noise).pow(2).mean().item() / batches
    return {t: tuple(v) for t, v in sums.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", nargs="+", default=["zoo:shapes-server"])
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--seed", type=int, default=777, help="held out: the teacher recipe trains on seeds 1234, 1235")
    args = ap.parse_args()
    rows = {spec: epsilon_errors(spec, args.batches, args.batch, args.seed) for spec in args.model}
    trivial = next(iter(rows.values()))
    print(f"epsilon MSE, {args.batches} held-out batches of {args.batch} (seed {args.seed})\n")
    print("| predictor | " + " | ".join(f"t = {t}" for t in TIMESTEPS) + " |")
    print("|---|" + "---:|" * len(TIMESTEPS))
    print("| trivial x_t / sqrt(1 - a) | " + " | ".join(f"{trivial[t][1]:.4f}" for t in TIMESTEPS) + " |")
    for spec, errors in rows.items():
        print(f"| {spec} | " + " | ".join(f"{errors[t][0]:.4f}" for t in TIMESTEPS) + " |")

if __name__ == "__main__":
    main()
