"""The scratch continuations of session 27 (docs/models.md, "The layout comes from the noise"), so that they can be
run again. Each step reads a model folder and writes one; `recipes/shapes-teacher-zsnr.yaml` continues the last one
into the teacher shipped since session 28. The first step starts from the epsilon teacher shipped before it:

    git worktree add /tmp/eps f60de24    # its models/zoo/shapes-server
    python benchmarks/teacher_zsnr_steps.py bind --model /tmp/eps/models/zoo/shapes-server --out runs/zs1   # 1.5 min
    python benchmarks/teacher_zsnr_steps.py high-noise --model runs/zs1 --schedule sdxl --out runs/zs3 \
        --seed 77 --ema 0.995 --warmup 50 --decay cosine --snr-gamma 5 --noise-offset 0.1              # 23 min
    python benchmarks/teacher_zsnr_steps.py high-noise --model runs/zs3 --schedule zero-snr --steps 1200 \
        --out runs/zs4                                                                                  # 16 min
    dreamlite run recipes/shapes-teacher-zsnr.yaml --out runs/zsnr                               # 29 + 77 min

`bind` teaches the text encoder the binding objective (BindingHead) with its states anchored to the original's, the
U-Net untouched. `high-noise` trains the U-Net as v-prediction at t >= 700 on colour-tagged position captions, the
text encoder frozen, and prints the relation signal at t = 999 every 100 steps.
"""
import argparse
import copy
import shutil
import time

import numpy as np
import torch
from diffusers import DDPMScheduler

import relation_signal
from dreamlite.evaluation.shapes.world import GEN_TAGS, sample_edit_train, sample_t2i
from dreamlite.io import read_json, write_json
from dreamlite.models.bundle import load_bundle
from dreamlite.models.teacher import SCHEDULES, EpsilonTask, t2i_batch
from dreamlite.models.text import BindingHead
from dreamlite.train import EMA, TrainSettings, lr_at


def copy_model(bundle, out, **meta):
    """The loaded ``bundle``'s folder copied to ``out`` with its dreamlite.json updated."""
    shutil.copytree(bundle.folder, out, dirs_exist_ok=True)
    write_json(f"{out}/dreamlite.json", {**read_json(f"{out}/dreamlite.json"), **meta})


def bind(args):
    torch.manual_seed(0)
    b = load_bundle(args.model)
    enc = b.text.float().train().requires_grad_(True)
    ref = copy.deepcopy(enc).eval().requires_grad_(False)
    head = BindingHead(enc.width)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.0)
    rng = np.random.default_rng(5)
    for step in range(args.steps):
        captions = [sample_t2i(rng, None, 0.5)[1] for _ in range(192)]
        prompts = captions + [sample_edit_train(rng).prompt for _ in range(48)]  # instructions are anchored too
        s, r = enc.encode(prompts), ref.encode(prompts)
        drift = ((s.states - r.states).pow(2).mean() / r.states.pow(2).mean()
                 + (s.pooled - r.pooled).pow(2).mean() / r.pooled.pow(2).mean())
        loss = head(s.states[:192], captions) + args.anchor * drift
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: binding {loss.item() - args.anchor * drift.item():.3f}, drift {drift.item():.4f}")
    copy_model(b, args.out)
    enc.eval().save_pretrained(f"{args.out}/text_encoder")


def high_noise(args):
    b = load_bundle(args.model)
    b.prediction = "v"
    unet = b.unet.float().train()
    b.text.float().eval().requires_grad_(False)
    task = EpsilonTask(unet, b.text, b.codec, args.snr_gamma, args.noise_offset, b.schedule, prediction="v")
    task.schedule = DDPMScheduler.from_config(SCHEDULES[args.schedule])
    b.meta["schedule"] = args.schedule  # what relation_signal reads
    params = dict(unet.named_parameters())
    opt = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=0.01)
    ema = EMA(params, args.ema)
    s = TrainSettings(steps=args.steps, batch=40, lr=args.lr, warmup=args.warmup, decay=args.decay, final_lr=0.1)
    position = tuple(float(t == "position") for t in GEN_TAGS)
    latent = (unet.config.in_channels, b.latent_size(), b.latent_size())
    t0 = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s)
        batch = t2i_batch(args.seed, step, 40, latent, 0.1, b.image_size, tag_weights=position, color_captions=1.0)
        batch["timesteps"] = 700 + batch["timesteps"] % 300
        if not args.noise_offset:
            batch.pop("offset")
        loss, _ = task(**batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(params, step)
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            live = {k: p.detach().clone() for k, p in params.items()}
            ema.copy_to(unet)
            unet.eval()
            sep, side = relation_signal.signal(b, 16, 1, 5.0)
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(live[k])
            unet.train()
            print(f"step {step + 1}: loss {loss.item():.4f}, relation separation {sep:.4f}, named side {side:.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    ema.copy_to(unet)
    copy_model(b, args.out, prediction="v", schedule=args.schedule)
    unet.eval().save_pretrained(args.out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["bind", "high-noise"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=None, help="bind: 800; high-noise: 1500")
    ap.add_argument("--anchor", type=float, default=10.0, help="bind: weight of the states' relative drift")
    ap.add_argument("--schedule", choices=list(SCHEDULES), default="sdxl", help="high-noise: training schedule")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--ema", type=float, default=0.99)
    ap.add_argument("--seed", type=int, default=78)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--decay", choices=["constant", "cosine"], default="constant")
    ap.add_argument("--snr-gamma", type=float, default=None, help="Min-SNR weight (default: plain v-MSE)")
    ap.add_argument("--noise-offset", type=float, default=0.0)
    args = ap.parse_args()
    args.steps = args.steps or (800 if args.step == "bind" else 1500)
    (bind if args.step == "bind" else high_noise)(args)


if __name__ == "__main__":
    main()
