"""Teacher training throughput (samples/s) and sampling throughput (images/s at 28 and 50 steps, guidance on) on
this CPU, for each speed option: fp32, bf16 autocast, channels_last, and (with --compile) torch.compile.

    python benchmarks/model_speed.py [--model shapes-server] [--batch 48] [--images 16] [--compile]

Text states are encoded once per batch and reused at every step (the sampler does this always).
"""
import argparse
import contextlib
import json
import time

import torch

from dreamlite.models.bundle import from_preset, load_bundle
from dreamlite.models.sampler import SamplerSettings, generate
from dreamlite.models.teacher import EpsilonTask, t2i_batch


def variants(compile_too: bool):
    out = {"fp32": {}, "bf16": {"bf16": True}, "channels_last": {"channels_last": True}}
    if compile_too:
        out["compile"] = {"compile": True}
    return out


def prepare(unet, channels_last=False, compile=False, **_):
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    if compile:
        unet.forward = torch.compile(unet.forward)
    return unet


def train_rate(batch: int, steps: int, bf16=False, **opts) -> float:
    b = from_preset("shapes-server")
    b.unet = prepare(b.unet, **opts)
    task = EpsilonTask(b.unet, b.text, b.codec)
    opt = torch.optim.AdamW(task.parameters(), 1e-4)
    times = []
    for step in range(steps + 2):
        data = t2i_batch(0, step, batch, (48, 16, 16))
        start = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss, _ = task(**data)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return batch / (sum(times[2:]) / steps)  # the first two steps warm up (and compile)


def sample_rate(model: str, images: int, steps: int, bf16=False, **opts) -> float:
    b = load_bundle(model, sampling=True)
    b.unet = prepare(b.unet, **opts)
    prompts = ["a red circle and a blue star", "three squares"] * (images // 2)
    s = SamplerSettings(steps=steps, cfg=5.0, batch=images, precision="bf16" if bf16 else "fp32")
    generate(b, prompts[:2], SamplerSettings(steps=2, batch=2))  # warm-up (and compile)
    start = time.perf_counter()
    generate(b, prompts, s)
    return images / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shapes-server", help="preset (random weights: speed does not depend on them) or folder")
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--train-steps", type=int, default=8)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    results = {"threads": torch.get_num_threads()}
    for name, opts in variants(args.compile).items():
        row = {"train_samples_per_s": round(train_rate(args.batch, args.train_steps, **opts), 1)}
        for steps in (28, 50):
            row[f"images_per_s_{steps}_steps"] = round(sample_rate(args.model, args.images, steps, **opts), 2)
        results[name] = row
        print(name, row, flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
