"""Where an epsilon teacher is weak along its schedule: its epsilon MSE at fixed timesteps on held-out rendered
batches (captions kept, plain Gaussian noise as at sampling), beside the trivial predictor eps = x_t / sqrt(1 - a)
(the clean image taken as 0): an epsilon error above the trivial one is where DDIM starts from a worse guess than grey.
A v-prediction model's output is converted to the epsilon it stands for.

Second table: at t = 999, the MSE of the clean estimate x0 = (x_t - sqrt(1 - a) eps) / sqrt(a), clipped to [-1, 1]
as the sampler clips it, from the training input (which still holds sqrt(a) = 7% of the image on SDXL's schedule)
and from the pure noise that sampling starts from, beside predicting each image's own mean colour. If the first is
far below the second, the model reads its layout from the leaked image; if both are far above the third, the first
steps of sampling are steered by the amplified epsilon error, not by the text.

    python benchmarks/teacher_error.py [--model zoo:shapes-server ...] [--batches 8 --batch 40 --seed 777]
"""
import argparse

import torch
from diffusers import DDPMScheduler

from dreamlite.models.bundle import load_bundle
from dreamlite.models.conditioning import unet_inputs
from dreamlite.models.teacher import SCHEDULES, clean_of, epsilon_of, t2i_batch

TIMESTEPS = (999, 900, 700, 500, 300, 100)


@torch.no_grad()
def epsilon_errors(spec: str, batches: int, batch: int, seed: int) -> tuple[dict[int, tuple[float, float]], dict]:
    """{timestep: (model MSE, trivial MSE)} over ``batches`` held-out batches of ``batch`` images, and the clean
    estimate's MSE at t = 999 {from the training input, from pure noise, mean colour}."""
    bundle = load_bundle(spec)
    unet = bundle.unet.float().eval()
    schedule = DDPMScheduler.from_config(SCHEDULES[bundle.schedule])
    latent = (unet.config.in_channels, bundle.latent_size(), bundle.latent_size())
    sums = {t: [0.0, 0.0] for t in TIMESTEPS}
    clean = dict.fromkeys(("training input", "pure noise", "each image's mean colour"), 0.0)
    a = schedule.alphas_cumprod[999]
    for i in range(batches):
        b = t2i_batch(seed, i, batch, latent, caption_dropout=0.0, size=bundle.image_size)
        x0, noise = bundle.codec.encode(b["images"]), b["noise"]
        text = bundle.text.encode(b["captions"])
        extra = unet_inputs(unet.config, text, bundle.image_size, bundle.image_size)
        for t in TIMESTEPS:
            ts = torch.full((batch,), t)
            noisy = schedule.add_noise(x0, noise, ts)
            pred = epsilon_of(unet(noisy, ts, **extra).sample, noisy, schedule.alphas_cumprod[t], bundle.prediction)
            trivial = noisy / (1 - schedule.alphas_cumprod[t]).sqrt()
            sums[t][0] += (pred - noise).pow(2).mean().item() / batches
            sums[t][1] += (trivial - noise).pow(2).mean().item() / batches
        t999 = torch.full((batch,), 999)
        for name, x in (("training input", schedule.add_noise(x0, noise, t999)), ("pure noise", noise)):
            eps = epsilon_of(unet(x, t999, **extra).sample, x, a, bundle.prediction)
            x0_hat = clean_of(eps, x, a).clamp(-1, 1)
            clean[name] += (x0_hat - x0).pow(2).mean().item() / batches
        clean["each image's mean colour"] += (x0.mean((2, 3), keepdim=True) - x0).pow(2).mean().item() / batches
    return {t: tuple(v) for t, v in sums.items()}, clean


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", nargs="+", default=["zoo:shapes-server"])
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--seed", type=int, default=777, help="held out: the teacher recipe trains on seeds 1234, 1235")
    args = ap.parse_args()
    results = {spec: epsilon_errors(spec, args.batches, args.batch, args.seed) for spec in args.model}
    rows = {spec: r[0] for spec, r in results.items()}
    trivial = next(iter(rows.values()))
    print(f"epsilon MSE, {args.batches} held-out batches of {args.batch} (seed {args.seed})\n")
    print("| predictor | " + " | ".join(f"t = {t}" for t in TIMESTEPS) + " |")
    print("|---|" + "---:|" * len(TIMESTEPS))
    print("| trivial x_t / sqrt(1 - a) | " + " | ".join(f"{trivial[t][1]:.4f}" for t in TIMESTEPS) + " |")
    for spec, errors in rows.items():
        print(f"| {spec} | " + " | ".join(f"{errors[t][0]:.4f}" for t in TIMESTEPS) + " |")
    names = list(next(iter(results.values()))[1])
    print("\nclean-estimate MSE at t = 999 (clipped to [-1, 1])\n\n| model | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for spec, (_, clean) in results.items():
        print(f"| {spec} | " + " | ".join(f"{clean[n]:.4f}" for n in names) + " |")

if __name__ == "__main__":
    main()
