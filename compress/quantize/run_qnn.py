"""Run a dreamlite artifact's U-Net through ONNX Runtime on a Snapdragon device's NPU (QNN HTP), check it against the
reference output recorded at export, and time it. Standalone: needs only numpy and onnxruntime (plus the
onnxruntime-qnn plugin, or an onnxruntime build with the QNN execution provider); copied into every artifact as
device/run_qnn.py.

    python device/run_qnn.py [ARTIFACT] [--provider qnn|cpu] [--runs 20] [--backend-path PATH] [--allow-fallback]

Prints one JSON line: provider, relative difference from the reference, median and best latency per call (ms).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np


def verify(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    for rel, info in manifest["files"].items():
        path = (folder / rel).resolve()
        if folder.resolve() not in path.parents:
            sys.exit(f"manifest.json: {rel} leaves the artifact folder")
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != info["sha256"]:
            sys.exit(f"{path}: missing or different from manifest.json")
    return manifest


def qnn_options(ort, backend_path: str | None, fallback: bool):
    """Session options with the QNN execution provider on its HTP backend: the plugin package (onnxruntime-qnn >= 2)
    when installed, else an onnxruntime build that has the provider compiled in."""
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.disable_cpu_ep_fallback", "0" if fallback else "1")
    try:
        import onnxruntime_qnn as qnn
    except ImportError:
        default = "QnnHtp.dll" if sys.platform == "win32" else "libQnnHtp.so"
        return opts, [("QNNExecutionProvider", {"backend_path": backend_path or default})]
    if qnn.EP_NAME not in {d.ep_name for d in ort.get_ep_devices()}:
        ort.register_execution_provider_library(qnn.EP_NAME, qnn.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == qnn.EP_NAME]
    opts.add_provider_for_devices(devices, {"backend_path": backend_path or qnn.get_qnn_htp_path()})
    return opts, None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", nargs="?", default=str(Path(__file__).resolve().parent.parent))
    ap.add_argument("--provider", choices=("qnn", "cpu"), default="qnn")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--backend-path", help="QNN backend library (default: the HTP backend)")
    ap.add_argument("--allow-fallback", action="store_true", help="let unsupported nodes run on the CPU")
    a = ap.parse_args(argv)
    import onnxruntime as ort

    folder = Path(a.artifact)
    manifest = verify(folder)
    with np.load(folder / "device" / "check.npz", allow_pickle=False) as z:
        feed = {i["name"]: z[f"input.{i['name']}"] for i in manifest["inputs"]}
        reference = z["output"]
    if a.provider == "qnn":
        opts, providers = qnn_options(ort, a.backend_path, a.allow_fallback)
        sess = ort.InferenceSession(str(folder / "unet.onnx"), opts, providers=providers)
    else:
        sess = ort.InferenceSession(str(folder / "unet.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, feed)[0]  # the first call also finalises the graph on the device
    times = []
    for _ in range(a.runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1000)
    diff = float(np.sqrt(((out - reference) ** 2).mean() / max(float((reference ** 2).mean()), 1e-12)))
    result = {"artifact": str(folder), "scheme": manifest["scheme"], "provider": a.provider,
              "relative_diff_vs_reference": round(diff, 5), "ms_median": round(float(np.median(times)), 2),
              "ms_best": round(min(times), 2), "runs": a.runs}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
