"""Sizes and CPU latencies of deployable artifacts (issue 6): teacher vs student, fp32 vs W8A16 vs W8A8, through
ONNX Runtime's CPU provider (the QNN HTP simulator on x86 is not a latency reference).

    python benchmarks/artifact_latency.py [--teacher zoo:shapes-server] [--student runs/quick/09-recover/model]
                                          [--threads 2] [--runs 20] [--json out.json]

One U-Net call of the static graph per timing (generation: 2 guidance branches as one batch), median of ``--runs``
after one warm-up call; bytes are the artifact folder's ONNX files.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from dreamlite.compress.quantize.artifact import GRAPH, export_artifact, load_artifact, random_feed
from dreamlite.compress.quantize.qdq import quantize_artifact
from dreamlite.models.bundle import load_bundle


def time_calls(folder: Path, threads: int, runs: int) -> float:
    manifest, sess = load_artifact(folder, threads)
    feed = random_feed(manifest)
    sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000


def onnx_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(GRAPH))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="zoo:shapes-server")
    ap.add_argument("--student", help="a recovered (or pruned) shapes-mobile model folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for role, spec in (("teacher", a.teacher), ("student", a.student)):
            if not spec:
                continue
            fp32 = Path(tmp) / f"{role}-fp32"
            manifest = export_artifact(load_bundle(spec), fp32, mode="generate")
            for scheme in ("fp32", "w8a16", "w8a8"):
                folder = fp32 if scheme == "fp32" else Path(tmp) / f"{role}-{scheme}"
                error = None
                if scheme != "fp32":
                    error = quantize_artifact(str(fp32), folder, scheme, calib=2, steps=4)["check"][
                        "relative_error_vs_fp32"]
                rows[f"{role} {scheme}"] = {"parameters": manifest["parameters"], "onnx_bytes": onnx_bytes(folder),
                                            "ms_per_call": round(time_calls(folder, a.threads, a.runs), 2),
                                            "relative_error_vs_fp32": error,
                                            "input": manifest["inputs"][0]["shape"]}
                print(f"{role} {scheme}", rows[f"{role} {scheme}"], flush=True)
    print("\n| model | parameters | ONNX MiB | ms / call | rel. error vs fp32 |\n|---|---:|---:|---:|---:|")
    for k, v in rows.items():
        err = "" if v["relative_error_vs_fp32"] is None else f"{v['relative_error_vs_fp32']:.3f}"
        print(f"| {k} | {v['parameters']:,} | {v['onnx_bytes'] / 2**20:.1f} | {v['ms_per_call']:.1f} | {err} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
