"""Pruning SDXL's U-Net (random weights) to DreamLite-0.39B: wall time and peak memory (max RSS) of dreamlite's
target pruning, beside torch-pruning's own pruner (MetaPruner through ``prune_width``, which adds the diffusers fix-ups:
GEGLU halves, heads, interface layers; magnitude importance; a channel ratio that leaves about 0.39B parameters)
on the same model. Each job runs in a fresh process so peaks do not mix.

    python benchmarks/prune_sdxl.py [--only dreamlite|torch-pruning] [--json out.json]

torch-pruning needs the whole fp32 teacher in memory (10.3 GB) plus its traced graph; dreamlite streams the teacher
one tensor at a time and holds only the student (1.56 GB).
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

DREAMLITE = """
from dreamlite.compress.prune.target import prune_to_target
import sys
r = prune_to_target("sdxl", "dreamlite-0.39b", sys.argv[1], calib=0)
print("PARAMS", r["parameters"])
"""

TORCH_PRUNING = """
import torch
from dreamlite.models.bundle import from_preset
from dreamlite.compress.prune import prune_width
from dreamlite.compress.prune.generic import example_inputs
unet = from_preset("sdxl").unet.eval()
prune_width(unet, float(sys.argv[2]), example_inputs(unet, 1, torch.Generator().manual_seed(0)), "magnitude")
print("PARAMS", sum(p.numel() for p in unet.parameters()))
"""


def measure(code: str, *args: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['x'] + sys.argv[1:]\n" + code, *args],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20  # KiB -> GiB; max over children so far
    params = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PARAMS")]
    return {"ok": proc.returncode == 0, "wall_s": round(wall, 1), "peak_rss_gib": round(peak, 2),
            "parameters": params[0] if params else None,
            "error": proc.stderr.strip().splitlines()[-1] if proc.returncode else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["dreamlite", "torch-pruning"])
    ap.add_argument("--ratio", type=float, default=0.61, help="torch-pruning channel ratio removed (0.61 -> ~0.39B)")
    ap.add_argument("--json")
    a = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        # dreamlite first: RUSAGE_CHILDREN keeps the largest child peak, so the smaller job must run first
        if a.only in (None, "dreamlite"):
            out["dreamlite"] = measure(DREAMLITE, f"{tmp}/student")
            print("dreamlite", out["dreamlite"], flush=True)
        if a.only in (None, "torch-pruning"):
            out["torch-pruning"] = measure(TORCH_PRUNING, tmp, str(a.ratio))
            print("torch-pruning", out["torch-pruning"], flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
