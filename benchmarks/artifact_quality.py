"""Quality of the deployable artifacts of one model (issue 6): GenEval-style and ImgEdit-style scores of fp32 torch,
fp32 ONNX, W8A16 and W8A8 QDQ ONNX, and neural-compressor's INT8 (calibrated in torch, exported to QDQ ONNX),
side by side on the same benchmarks, seeds and sampler settings.

    python benchmarks/artifact_quality.py --model runs/full/02-recover/model [--n-per-tag 20] [--n-per-type 10]
                                          [--calib 8] [--fallback 2] [--no-inc] [--json out.json]

Every quantized variant is calibrated on the same sampler-recorded denoiser calls (generations and edits at the
model's default steps and guidance; prompts from a seed the benchmarks do not use). The fp32 artifact is exported in
edit mode (a static batch of 3), which serves generation (2 branches) too.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

from dreamlite.compress.quantize.artifact import export_artifact
from dreamlite.compress.quantize.qdq import quantize_artifact
from dreamlite.evaluation.model_bench import bench_edit, bench_gen
from dreamlite.models.bundle import load_bundle
from dreamlite.models.sampler import default_settings


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="an in-context (DreamLite-layout) model folder")
    ap.add_argument("--n-per-tag", type=int, default=20)
    ap.add_argument("--images-per-prompt", type=int, default=1)
    ap.add_argument("--n-per-type", type=int, default=10)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--fallback", type=int, default=2, help="modules at 16 bits in the mixed-precision W8A8 row")
    ap.add_argument("--no-inc", action="store_true", help="skip neural-compressor (not installed)")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch_model = load_bundle(a.model)
    settings = default_settings(torch_model)
    settings.seed = a.seed
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = tmp / "fp32"
        export_artifact(torch_model, fp32, mode="edit")
        variants = {"fp32 torch": (lambda: torch_model), "fp32 ONNX": (lambda: load_bundle(str(fp32)))}
        quantized = [("W8A16 QDQ ONNX", "w8a16", "ort", 0), ("W8A8 QDQ ONNX", "w8a8", "ort", 0),
                     (f"W8A8 QDQ ONNX, {a.fallback} modules at 16 bits", "w8a8", "ort", a.fallback)]
        if not a.no_inc:
            quantized.append(("INC INT8 (PT2E -> QDQ ONNX)", "w8a8", "inc", 0))
        for name, scheme, backend, fallback in quantized:
            def qdq(scheme=scheme, backend=backend, fallback=fallback, out=tmp / name.replace(" ", "_")):
                quantize_artifact(str(fp32), out, scheme, calib=a.calib, seed=0, backend=backend, fallback=fallback)
                return load_bundle(str(out))
            variants[name] = qdq
        for name, make in variants.items():
            start = time.perf_counter()
            bundle = make()
            gen = bench_gen(bundle, tmp / name / "gen", a.n_per_tag, a.images_per_prompt, settings, a.seed)
            edit = bench_edit(bundle, tmp / name / "edit", a.n_per_type, settings, a.seed)
            rows[name] = {"gen": round(gen["overall"], 3), "edit": round(edit["overall"], 2),
                          "gen_per_tag": {k: round(v, 2) for k, v in gen["per_tag"].items()},
                          "edit_per_type": {k: round(v["overall"], 2) for k, v in edit["per_type"].items()},
                          "seconds": round(time.perf_counter() - start, 1)}
            print(name, rows[name], flush=True)
    base = rows["fp32 torch"]
    grid = f"{settings.steps} steps (flow shift {settings.flow_shift})"
    print(f"\n{a.n_per_tag} prompts per tag x {a.images_per_prompt}, {a.n_per_type} edits per type, {grid}, "
          f"guidance {settings.cfg} / image {settings.image_cfg}, seed {a.seed}\n")
    print("| variant | GenEval-style | vs fp32 | ImgEdit-style | vs fp32 |\n|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['gen']:.3f} | {r['gen'] - base['gen']:+.3f} | {r['edit']:.2f} | "
              f"{r['edit'] - base['edit']:+.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
