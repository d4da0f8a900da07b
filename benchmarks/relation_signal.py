"""Does a model's first clean estimate carry the relation? Colour-tagged position prompts ("a red circle left of a
blue square") at t = 999 from pure noise, as sampling starts: the guided clean estimate is decoded, and the offset
between the red and the blue pixel mass along the relation's axis is measured, positive on the named side.

Rendered scenes that satisfy the prompts separate the two by 0.45 of the canvas, every one on the named side (the
table's first row); the mean of those scenes per prompt, which is what an ideal denoiser estimates from pure noise
(E[x0 | prompt]), by 0.35 (the second). A model that has learnt p(layout | text) moves its estimates that way; one whose layout comes
from the noise scores 0, with half of them on the named side. `teacher_relations.py` judges finished samples; this
watches the start of sampling, a continuous figure for following a training run.

    python benchmarks/relation_signal.py [--model zoo:shapes-server ...] [--n 48 --seed 1 --cfg 5]
"""
import argparse

import numpy as np
import torch

from dreamlite.data import images_to_tensor
from dreamlite.evaluation.shapes import render
from dreamlite.evaluation.shapes.spec import COLORS
from dreamlite.evaluation.shapes.world import GenPrompt, scene_for
from dreamlite.models.bundle import load_bundle
from dreamlite.models.conditioning import unet_inputs
from dreamlite.models.sampler import guide
from dreamlite.models.teacher import SCHEDULES, clean_of

PAIRS = (("circle", "square"), ("star", "triangle"), ("diamond", "cross"))
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}  # axis (x, y), sign


def centroids(images: torch.Tensor, color: str) -> torch.Tensor:
    """(B, 2) x, y centroids in [0, 1] of each image's pixel mass near ``color``; images (B, 3, H, W) in [-1, 1]."""
    rgb = torch.tensor(COLORS[color], dtype=images.dtype) / 127.5 - 1
    w = torch.exp(-(images - rgb.view(1, 3, 1, 1)).pow(2).sum(1) / 0.3)  # (B, H, W): closeness to the colour
    grid = torch.linspace(0, 1, images.shape[-1])
    total = w.sum((1, 2))
    return torch.stack([(w.sum(1) * grid).sum(-1) / total, (w.sum(2) * grid).sum(-1) / total], dim=1)


def prompts():
    """(caption, axis, sign, the GenPrompt it is) for every pair and relation; the caption names the second object
    first ("a red circle left of a blue square": the circle stands left of the square)."""
    for first, second in PAIRS:
        for relation, (axis, sign) in RELATIONS.items():
            p = GenPrompt("position", ((second, "blue"), (first, "red")), relation=relation)
            yield p.prompt, axis, sign, p


def separation(images: torch.Tensor, axis: int, sign: int) -> torch.Tensor:
    """(B,) red-minus-blue centroid offset along ``axis``, positive on the named side."""
    return sign * (centroids(images, "red") - centroids(images, "blue"))[:, axis]


def summary(seps: list[torch.Tensor]) -> tuple[float, float]:
    """(mean separation, fraction on the named side), each averaged over prompts."""
    return (torch.stack([d.mean() for d in seps]).mean().item(),
            torch.stack([(d > 0).float().mean() for d in seps]).mean().item())


def truth(n: int, seed: int, size: int = 64) -> tuple[tuple[float, float], tuple[float, float]]:
    """The same figures on rendered scenes that satisfy each prompt, and on each prompt's mean scene: the mean of
    the scenes a prompt allows is the ideal denoiser's clean estimate from pure noise, E[x0 | prompt], so it is what
    a model's first estimate moves towards when it reads the relation."""
    rng, seps, means = np.random.default_rng(seed), [], []
    for _, axis, sign, p in prompts():
        images = images_to_tensor([render(scene_for(p, rng), size) for _ in range(n)])
        seps.append(separation(images, axis, sign))
        means.append(separation(images.mean(0, keepdim=True), axis, sign))
    return summary(seps), summary(means)


@torch.no_grad()
def signal(bundle, n: int, seed: int, cfg: float) -> tuple[float, float]:
    """(mean signed separation, fraction of estimates with red on the named side) over every pair and relation."""
    from diffusers import DDPMScheduler

    unet = bundle.unet.float().eval()
    a = DDPMScheduler.from_config(SCHEDULES[bundle.schedule]).alphas_cumprod[999]
    size, latent = bundle.image_size, bundle.latent_size()
    x = torch.randn((n, unet.config.in_channels, latent, latent), generator=torch.Generator().manual_seed(seed))
    t = torch.full((n,), 999)
    empty = bundle.text.encode([""] * n)
    seps = []
    for caption, axis, sign, _ in prompts():
        text = bundle.text.encode([caption] * n)
        out = guide([unet(x, t, **unet_inputs(unet.config, c, size, size)).sample for c in (empty, text)], cfg, 1.0)
        # a v model's clean estimate directly (on the zero-snr schedule alpha_bar is 0 here: epsilon has no x0)
        x0 = a.sqrt() * x - (1 - a).sqrt() * out if bundle.prediction == "v" else clean_of(out, x, a)
        seps.append(separation(bundle.codec.decode(x0.clamp(-1, 1)), axis, sign))
    return summary(seps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["zoo:shapes-server"])
    ap.add_argument("--n", type=int, default=48, help="noises per prompt")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cfg", type=float, default=5.0)
    args = ap.parse_args()
    print(f"{len(PAIRS) * len(RELATIONS)} prompts x {args.n} noises (seed {args.seed}), t = 999, guidance {args.cfg}\n")
    print("| model | separation on the named side | estimates on the named side |")
    print("|---|---:|---:|")
    scenes, mean = truth(max(args.n, 200), args.seed)
    print("| rendered scenes that satisfy each prompt | %.4f | %.3f |" % scenes)
    print("| their mean per prompt (the ideal first estimate, E[x0 | prompt]) | %.4f | %.3f |" % mean)
    for spec in args.model:
        sep, side = signal(load_bundle(spec), args.n, args.seed, args.cfg)
        print(f"| {spec} | {sep:.4f} | {side:.3f} |")


if __name__ == "__main__":
    main()
