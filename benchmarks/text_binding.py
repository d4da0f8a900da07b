"""Does a text encoder bind? A fresh linear probe reads, from the state of each shape word, the colour its caption
gives that object (colour-attribute captions: "a red circle and a blue star"), the side it is on (position captions:
"a circle left of a square" puts the circle left and the square right) and its count (counting captions), trained on
one set of training captions and scored on another. Cross-attention reads token states through linear maps, so what
a linear probe cannot read there, the U-Net cannot bind either. A randomly initialised encoder of the same shape is
the floor (its states still mix in their neighbours).

    python benchmarks/text_binding.py [--model zoo:shapes-server ...] [--captions 3000 --seed 11]
"""
import argparse

import numpy as np
import torch

from dreamlite.evaluation.probe import linear_probe
from dreamlite.evaluation.shapes.world import GEN_TAGS, sample_t2i
from dreamlite.models.bundle import load_bundle
from dreamlite.models.text import BindingHead, ShapesTextEncoder

PROBES = {"colour": ("color_attr", 0), "side": ("position", 2), "count": ("counting", 1)}  # tag, target column


def captions(tag: str, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    weights = tuple(float(t == tag) for t in GEN_TAGS)
    return [sample_t2i(rng, weights)[1] for _ in range(n)]


@torch.no_grad()
def features(encoder, texts: list[str], column: int) -> tuple[torch.Tensor, torch.Tensor]:
    where, labels = BindingHead.targets(texts)
    states = torch.cat([encoder.encode(texts[i:i + 500]).states for i in range(0, len(texts), 500)])
    return states[where[:, 0], where[:, 1]].float(), labels[:, column]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["zoo:shapes-server"])
    ap.add_argument("--captions", type=int, default=3000, help="training captions per probe (a fifth as many held out)")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    sets = {name: (captions(tag, args.captions, args.seed), captions(tag, args.captions // 5, args.seed + 1))
            for name, (tag, _) in PROBES.items()}
    torch.manual_seed(args.seed)
    encoders = {"random ShapesTextEncoder": ShapesTextEncoder.for_shapes().eval()}
    encoders |= {spec: load_bundle(spec).text for spec in args.model}
    print(f"held-out accuracy of a linear probe on the shape words' states ({args.captions} training captions per "
          f"probe, seed {args.seed})\n")
    print("| text encoder | " + " | ".join(PROBES) + " |\n|---|" + "---:|" * len(PROBES))
    for name, enc in encoders.items():
        row = [linear_probe(features(enc, train, PROBES[p][1]), features(enc, test, PROBES[p][1]))
               for p, (train, test) in sets.items()]
        print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in row) + " |")


if __name__ == "__main__":
    main()
