"""Where the teacher's velocity is a good distillation target, and whether a student's own trajectory leaves the
states it was trained on.

1. Per sigma, on the same held-out scenes and noise: the flow-matching loss ``|v - (eps - x0)|^2`` of the teacher
   (an epsilon or v model through ``FlowView``: its prediction converted at the timestep of equal SNR) and of each
   ``--model``. Output distillation pulls a student toward the teacher's velocity; where the teacher's loss is above
   the student's, that target is worse than the data's.
2. Per sigma of a flow-shifted Euler grid: each model's squared distance to the teacher's velocity, on the states of
   its own guided trajectory (from pure noise, guidance ``--cfg``) against on data-noised states at the same sigma
   (exposure bias: a ratio well above 1 says its samples drift where it was never trained).

    python benchmarks/flow_gap.py --model runs/quick/09-recover/model [--model ...] [--n 64 --steps 20 --cfg 3.5
        --flow-shift 3 --seed 9000017]
"""
import argparse

import torch

from dreamlite.compress.distill import FlowView, flow_noise
from dreamlite.compress.distill.heldout import held_out_draws, held_out_t2i, teacher_held_out_losses
from dreamlite.data import ShapesData
from dreamlite.models.bundle import load_bundle
from dreamlite.models.sampler import guide, make_scheduler
from dreamlite.models.text import TextStates

SIGMAS = (0.93, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


def view_of(b) -> FlowView:
    b.unet.float().eval()
    return FlowView(b.unet, b.prediction, b.schedule, b.in_context, b.image_size)


def velocity(view: FlowView, x: torch.Tensor, sigma: float, text: TextStates, batch: int = 16) -> torch.Tensor:
    s = torch.full((len(x),), sigma)
    return torch.cat([view(x[k:k + batch], s[k:k + batch], text[k:k + batch])[0] for k in range(0, len(x), batch)])


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", required=True, help="a flow student (repeatable)")
    ap.add_argument("--teacher", default="zoo:shapes-server")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=3.5)
    ap.add_argument("--flow-shift", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=9_000_017)
    a = ap.parse_args()
    bundles = {"teacher": load_bundle(a.teacher), **{m: load_bundle(m) for m in a.model}}
    data = ShapesData(bundles["teacher"].image_size)

    # 1. the held-out rows of every model (a flow student is seen as it is, the teacher converted at equal SNR)
    rows = {m: teacher_held_out_losses(b, data, a.n, SIGMAS, a.seed)["t2i"]["per_sigma"] for m, b in bundles.items()}
    print("held-out velocity loss per sigma (teacher converted at equal SNR)")
    print(f"{'sigma':>6} {'teacher':>9} " + " ".join(f"{m[-40:]:>12}" for m in a.model))
    for s in map(str, SIGMAS):
        print(f"{float(s):6.2f} {rows['teacher'][s]:9.4f} " + " ".join(f"{rows[m][s]:12.4f}" for m in a.model))

    # 2. the same samples and noise (held_out_losses' draws), followed along each student's guided trajectory
    teacher_bundle = bundles["teacher"]
    teacher, students = view_of(teacher_bundle), {m: view_of(bundles[m]) for m in a.model}
    x0, noise, text = held_out_t2i(teacher_bundle, data, a.n, *held_out_draws(a.seed))
    empty = teacher_bundle.text.encode([""] * a.n)

    grid = make_scheduler("flow", a.steps, flow_shift=a.flow_shift).sigmas.tolist()
    reach = teacher.convert.sigma_max if teacher.convert is not None else 1.0
    for name, student in students.items():
        print(f"\n{name}: squared distance to the teacher's velocity, on its own trajectory / on data")
        x = noise.clone()
        for s, s_next in zip(grid[:-1], grid[1:]):
            if s <= reach:
                v_t = velocity(teacher, x, s, text)
                own = (velocity(student, x, s, text) - v_t).pow(2).mean().item()
                xd = flow_noise(x0, noise, torch.full((a.n,), s))
                data = (velocity(student, xd, s, text) - velocity(teacher, xd, s, text)).pow(2).mean().item()
                print(f"  sigma {s:.3f}: {own:.4f} / {data:.4f} (x{own / data:.2f})")
            u, c = velocity(student, x, s, empty), velocity(student, x, s, text)
            x = x + (s_next - s) * guide([u, c], a.cfg, 1.0)


if __name__ == "__main__":
    main()
