"""Where along the trajectory a model loses the scene: SDEdit-style, each held-out scene is noised to a starting
sigma s0 and brought back to sigma 0 by the same guided flow-matching Euler integrator for every model (an epsilon
or v teacher through ``FlowView``, its output converted at the timestep of equal SNR). The judge's parser then says
which of the scene's objects came back with their shape and colour, within 0.1 of the canvas of where they were.

A model that keeps the objects from s0 renders, given the layout, what the noisy input still shows; the lowest s0
where it loses them is where its samples go wrong. Unlike the held-out velocity loss, this follows the model's own
trajectory, so errors that compound over steps count.

    python benchmarks/denoise_from.py --model zoo:shapes-server --model runs/full/02-recover/model \
        [--sigmas 0.2,0.4,0.6,0.8,0.9 --steps 20 --cfg 3.5 --n 48 --seed 123]
"""
import argparse

import numpy as np
import torch

from dreamlite.compress.distill import FlowView, flow_noise
from dreamlite.data import images_to_tensor
from dreamlite.evaluation.shapes import render
from dreamlite.evaluation.shapes.match import distance, match
from dreamlite.evaluation.shapes.perception import parse
from dreamlite.evaluation.shapes.world import sample_t2i
from dreamlite.models.bundle import load_bundle
from dreamlite.models.codec import to_uint8
from dreamlite.models.sampler import guide
from dreamlite.models.text import TextStates


@torch.no_grad()
def denoise_from(spec: str, sigmas: list[float], steps: int, cfg: float, n: int, seed: int) -> dict[float, dict]:
    """{s0: {"objects": share of objects kept, "scenes": share of scenes with every object kept}}."""
    b = load_bundle(spec)
    b.unet.float().eval()
    rng = np.random.default_rng(seed)
    scenes, captions = zip(*(sample_t2i(rng) for _ in range(n)))
    x0 = b.codec.encode(images_to_tensor([render(s, b.image_size) for s in scenes]))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    view = FlowView(b.unet, b.prediction, b.schedule, b.in_context, b.image_size)
    text = TextStates.cat([b.text.encode([""] * n), b.text.encode(list(captions))])
    out = {}
    for s0 in sigmas:
        x = flow_noise(x0, noise, torch.full((n,), s0))
        grid = np.linspace(s0, 0.0, steps + 1)
        for a, c in zip(grid[:-1], grid[1:]):  # Euler on the guided velocity: x += (c - a) v
            v, _ = view(torch.cat([x, x]), torch.full((2 * n,), float(a)), text)
            x = x + (c - a) * guide(list(v.chunk(2)), cfg, 1.0)
        kept, whole = 0, 0
        for image, scene in zip(to_uint8(b.codec.decode(x)), scenes):
            seen = parse(image).objects
            ok = sum((seen[j].shape, seen[j].color) == (scene.objects[i].shape, scene.objects[i].color)
                     and distance(seen[j], scene.objects[i]) < 0.1 for i, j in match(scene.objects, seen))
            kept, whole = kept + ok, whole + (ok == len(scene.objects))
        total = sum(len(s.objects) for s in scenes)
        out[s0] = {"objects": kept / total, "scenes": whole / n}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", required=True, help="preset, zoo:NAME or model folder (repeat)")
    ap.add_argument("--sigmas", default="0.2,0.4,0.6,0.8,0.9", help="starting sigmas, comma-separated")
    ap.add_argument("--steps", type=int, default=20, help="Euler steps from each starting sigma to 0")
    ap.add_argument("--cfg", type=float, default=3.5)
    ap.add_argument("--n", type=int, default=48, help="held-out scenes")
    ap.add_argument("--seed", type=int, default=123)
    a = ap.parse_args()
    sigmas = [float(s) for s in a.sigmas.split(",")]
    print(f"{a.n} scenes (seed {a.seed}), {a.steps} Euler steps from each s0, guidance {a.cfg}: objects kept "
          "(shape, colour, place) / scenes with every object kept\n")
    print("| model | " + " | ".join(f"s0 = {s}" for s in sigmas) + " |")
    print("|---|" + "---:|" * len(sigmas))
    for spec in a.model:
        r = denoise_from(spec, sigmas, a.steps, a.cfg, a.n, a.seed)
        print(f"| {spec} | " + " | ".join(f"{r[s]['objects']:.2f} / {r[s]['scenes']:.2f}" for s in sigmas) + " |",
              flush=True)


if __name__ == "__main__":
    main()
