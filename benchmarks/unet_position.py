"""Does a U-Net know where it is? A fresh linear probe reads, from the feature vector at each location of a layer,
that location's column (and row), on held-out inputs: pure noise at t = 999 with training captions, where the layout
is decided. A U-Net without positional embeddings can only learn position from the convolutions' zero padding; a
randomly initialised U-Net of the same preset shows what the padding gives before any training.

    python benchmarks/unet_position.py [--model zoo:shapes-server ...] [--batches 3 --batch 16 --t 999 --seed 3]
"""
import argparse

import numpy as np
import torch

from dreamlite.evaluation.probe import linear_probe
from dreamlite.evaluation.shapes.world import sample_t2i
from dreamlite.models.bundle import from_preset, load_bundle
from dreamlite.models.conditioning import unet_inputs


def layers(unet) -> dict[str, torch.nn.Module]:
    """The last ResNet of each down and up block, and the mid block: one feature map per resolution and side."""
    named = {f"down {i}": b.resnets[-1] for i, b in enumerate(unet.down_blocks)}
    named["mid"] = unet.mid_block
    named |= {f"up {i}": b.resnets[-1] for i, b in enumerate(unet.up_blocks)}
    return named


@torch.no_grad()
def features(bundle, batches: int, batch: int, t: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (features (N, C), column labels (N,))}; rows of (H, W) maps are flattened location by location."""
    unet = bundle.unet.float().eval()
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    size, latent = bundle.image_size, bundle.latent_size()
    taps = layers(unet)
    out: dict[str, list] = {name: [] for name in taps}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: out[name].append(o[0] if isinstance(o, tuple) else o))
             for name, m in taps.items()]
    for _ in range(batches):
        captions = [sample_t2i(rng)[1] for _ in range(batch)]
        x = torch.randn((batch, unet.config.in_channels, latent, latent), generator=gen)
        unet(x, torch.full((batch,), t), **unet_inputs(unet.config, bundle.text.encode(captions), size, size))
    for h in hooks:
        h.remove()
    result = {}
    for name, maps in out.items():
        f = torch.cat(maps)  # (B, C, H, W)
        cols = torch.arange(f.shape[-1]).expand(*f.shape[:1], f.shape[-2], -1)
        result[name] = (f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), cols.reshape(-1))
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["zoo:shapes-server"])
    ap.add_argument("--batches", type=int, default=3, help="training batches (one more is held out)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--t", type=int, default=999, help="timestep of the noisy input")
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    first = load_bundle(args.model[0])
    bundles = {"random init": from_preset(first.meta["preset"], seed=args.seed)} if "preset" in first.meta else {}
    bundles[args.model[0]] = first
    bundles |= {spec: load_bundle(spec) for spec in args.model[1:]}
    for b in bundles.values():
        b.text = first.text  # the same captions' states for every U-Net
    print(f"held-out accuracy of a linear probe for the column of each location (t = {args.t}, "
          f"{args.batches} x {args.batch} training inputs, seed {args.seed})\n")
    rows = {}
    for name, bundle in bundles.items():
        train = features(bundle, args.batches, args.batch, args.t, args.seed)
        test = features(bundle, 1, args.batch, args.t, args.seed + 1)
        rows[name] = {layer: linear_probe(train[layer], test[layer]) for layer in train}
        widths = {layer: int(cols.max()) + 1 for layer, (_, cols) in test.items()}  # square maps
    print("| U-Net | " + " | ".join(f"{n} ({w}x{w})" for n, w in widths.items()) + " |\n|---|" + "---:|" * len(widths))
    for model, r in rows.items():
        print(f"| {model} | " + " | ".join(f"{r[n]:.2f}" for n in widths) + " |")
    print("\nchance: 1 / the map's width")


if __name__ == "__main__":
    main()
