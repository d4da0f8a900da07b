"""Deployable artifacts: a folder a phone (or ONNX Runtime anywhere) runs, self-describing and checked on load.

    unet.onnx [+ unet.onnx.data]   the denoiser, static shapes (batch = guidance branches, in-context width included)
    config.json                    the U-Net's diffusers config (what the graph computes; no weights)
    text_encoder/, dreamlite.json  copied from the model, so the artifact samples on its own
    manifest.json                  inputs / outputs (names, shapes, dtypes), scheme, image size, parameter count,
                                   bytes, the export check, and the sha256 of every file

``load_artifact`` refuses a folder whose files do not match the manifest, or whose manifest names a path outside it.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import torch

from dreamlite.io import DreamliteError, inside, read_json, write_json

from .export import example_inputs, export_onnx, input_names

MANIFEST = "manifest.json"
GRAPH = "unet.onnx"
FORMAT = "dreamlite-onnx/1"
MODES = ("generate", "edit")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, dict]:
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def _io(session) -> tuple[list[dict], list[dict]]:
    def rows(items):
        return [{"name": i.name, "shape": list(i.shape), "dtype": i.type.replace("tensor(", "").rstrip(")")}
                for i in items]
    return rows(session.get_inputs()), rows(session.get_outputs())


def session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export_artifact(bundle, out, size: int | None = None, mode: str = "generate", batch: int | None = None) -> dict:
    """Export ``bundle``'s U-Net (fp32) into the artifact folder ``out`` and check ONNX Runtime against torch."""
    from dreamlite.models.sampler import default_settings, guidance_branches

    if mode not in MODES:
        raise DreamliteError(f"--mode: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "edit" and not bundle.in_context:
        raise DreamliteError(f"{bundle.name}: --mode edit needs an in-context model (DreamLite layout)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = size or bundle.image_size
    factor = bundle.codec.factor if bundle.codec else 8
    if size % (factor * 2 ** (len(bundle.unet.config.block_out_channels) - 1)):
        raise DreamliteError(f"--size: {size} px is not a multiple of what the U-Net downsamples to")
    h = size // factor
    latent = (h, 2 * h if bundle.in_context else h)
    batch = batch or guidance_branches(default_settings(bundle), mode == "edit")  # all branches in one call
    tokens = bundle.text_tokens
    unet = bundle.unet.float().eval()
    export_onnx(unet, out / GRAPH, batch, latent, (size, size), tokens,
                external=sum(p.numel() for p in unet.parameters()) * 4 > 1_800_000_000)
    unet.save_config(out)
    if bundle.folder is not None:
        copy_companions(bundle.folder, out, ("text_encoder", "dreamlite.json"))
    sess = session(out / GRAPH)
    inputs, outputs = _io(sess)
    args = example_inputs(unet, batch, latent, tokens)
    with torch.no_grad():
        from .export import UNetGraph
        ref = UNetGraph(unet, size, size)(*args).numpy()
    got = sess.run(None, {n: a.numpy() for n, a in zip(input_names(unet), args)})[0]
    diff = float(np.abs(got - ref).max())
    manifest = {
        "format": FORMAT, "scheme": "fp32", "model": bundle.name, "mode": mode, "image_size": [size, size],
        "latent": [unet.config.in_channels, *latent], "batch": batch, "text_tokens": tokens, "opset": 21,
        "in_context": bundle.in_context, "prediction": bundle.prediction,
        "inputs": inputs, "outputs": outputs, "parameters": sum(p.numel() for p in unet.parameters()),
        "check": {"ort_vs_torch_max_abs": diff, "torch_max_abs": float(np.abs(ref).max())},
    }
    write_device_kit(out, sess, {n: a.numpy() for n, a in zip(input_names(unet), args)}, manifest)
    return seal(out, manifest)


def copy_companions(src: Path, out: Path, names: tuple[str, ...]) -> None:
    """Copy the files and folders ``names`` that exist in ``src`` into ``out``."""
    for name in names:
        if (src / name).is_dir():
            shutil.copytree(src / name, out / name, dirs_exist_ok=True)
        elif (src / name).is_file():
            shutil.copy2(src / name, out / name)


DEVICE_GUIDE = """# Running this artifact on a Snapdragon device

`unet.onnx` is the {scheme} denoiser: static shapes {shapes}; {branches} guidance branches per call
({mode}). `check.npz` holds one input feed and the output ONNX Runtime's CPU provider gives for it.

**Windows on Snapdragon (Python, arm64)** or any machine with ONNX Runtime's QNN execution provider:

    pip install numpy onnxruntime onnxruntime-qnn
    python device/run_qnn.py             # NPU (HTP), CPU fallback off: fails unless every node runs on the NPU
    python device/run_qnn.py --provider cpu

It verifies every file against `manifest.json`, runs the feed, prints the relative difference from the reference
and the latency per call. With the `onnxruntime-qnn` plugin the HTP backend library is found automatically; with an
ONNX Runtime build that has the provider compiled in, pass `--backend-path QnnHtp.dll` (`libQnnHtp.so` on Linux).

**Android**: the same graph runs through ONNX Runtime's Android package with the QNN execution provider
(Maven `com.microsoft.onnxruntime:onnxruntime-android-qnn`, or Qualcomm's plugin
`com.qualcomm.qti:onnxruntime-android-qnn`): add the QNN provider with provider option
`backend_path=libQnnHtp.so` and session config `session.disable_cpu_ep_fallback=1`, feed the inputs listed in
`manifest.json` (float32, the shapes above), and compare with `check.npz`. QNN's context-binary cache
(provider option `ep.context_enable`) saves the compiled graph so later sessions start fast.

The full sampler (text encoder, guidance, scheduler) is dreamlite's: on a machine with dreamlite installed,
`dreamlite bench gen --model ARTIFACT` scores the artifact end to end through ONNX Runtime.
"""


def random_feed(manifest: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded feed of the artifact's static shapes: Gaussian inputs, timestep 500 (mid-schedule)."""
    rng = np.random.default_rng(seed)
    return {i["name"]: (np.full(i["shape"], 500.0, np.float32) if i["name"] == "timestep"
                        else rng.standard_normal(i["shape"]).astype(np.float32)) for i in manifest["inputs"]}


def write_device_kit(out: Path, sess, feed: dict[str, np.ndarray], manifest: dict) -> None:
    """``out/device/``: the standalone runner (run_qnn.py), its guide, and one feed with the CPU provider's output
    (``check.npz``, no pickle) so a device run can be checked against it."""
    device = out / "device"
    device.mkdir(exist_ok=True)
    shutil.copy2(Path(__file__).with_name("run_qnn.py"), device / "run_qnn.py")
    arrays = {f"input.{k}": np.ascontiguousarray(v, np.float32) for k, v in feed.items()}
    np.savez(device / "check.npz", output=sess.run(None, feed)[0], **arrays)
    shapes = ", ".join(f"{i['name']} {i['shape']}" for i in manifest["inputs"])
    (device / "README.md").write_text(DEVICE_GUIDE.format(scheme=manifest["scheme"], shapes=shapes,
                                                          branches=manifest["batch"], mode=manifest["mode"]))


def seal(out: Path, manifest: dict) -> dict:
    """Add the size and sha256 of every file in ``out`` to ``manifest`` and write it (last, so a folder with a
    manifest is complete)."""
    files = _files(out)
    manifest = {**manifest, "bytes": sum(f["bytes"] for f in files.values()), "files": files}
    write_json(out / MANIFEST, manifest)
    return manifest


def verify(folder) -> dict:
    """The manifest of an artifact folder, after checking every file it lists (present, inside, same sha256)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise DreamliteError(f"{folder}: not an artifact (no {MANIFEST})")
    manifest = read_json(folder / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise DreamliteError(f"{folder / MANIFEST}: format: expected {FORMAT!r} with a files table")
    for rel, info in manifest["files"].items():
        path = inside(folder, rel, f"{folder / MANIFEST}: files")
        if not path.is_file():
            raise DreamliteError(f"{folder / MANIFEST}: files: {rel} is missing")
        if not isinstance(info, dict) or sha256(path) != info.get("sha256"):
            raise DreamliteError(f"{path}: does not match the manifest's sha256 (changed or corrupt)")
    return manifest


def load_artifact(folder, threads: int | None = None):
    """(manifest, ONNX Runtime session) of a verified artifact folder."""
    folder = Path(folder)
    manifest = verify(folder)
    return manifest, session(folder / GRAPH, threads)
