"""W8A16 / W8A8 QDQ quantization for Qualcomm QNN, calibrated on what the deployed sampler actually feeds the U-Net.

Calibration runs the project's own sampler (the steps and guidance the model's defaults give) on the fp32 artifact
and records every denoiser call: text-to-image prompts, and for in-context models instruction edits too, at every
step, all guidance branches. ONNX Runtime's QNN configuration (``get_qnn_qdq_config``) then places QDQ pairs as QNN
wants: 16-bit (W8A16, Qualcomm's choice for Stable Diffusion) or 8-bit (W8A8) activations, 8-bit per-channel conv
weights where QNN allows.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from dreamlite.io import DreamliteError
from dreamlite.models.sampler import OrtDenoiser

from .artifact import (GRAPH, MANIFEST, _io, copy_companions, export_artifact, load_artifact, seal, session,
                       write_device_kit)

SCHEMES = ("w8a16", "w8a8")


class _Recorder(OrtDenoiser):
    """An ONNX Runtime denoiser that also keeps every feed it runs (the calibration set)."""

    def __init__(self, session):
        super().__init__(session)
        self.recorded: list[dict[str, np.ndarray]] = []

    def feeds(self, x, t, text):
        for feed, n in super().feeds(x, t, text):
            self.recorded.append(feed)
            yield feed, n


def calibration_feeds(bundle, n: int, seed: int, steps: int | None = None) -> list[dict[str, np.ndarray]]:
    """Denoiser feeds of ``n`` generations (and ``n`` edits for in-context models) with the model's sampling
    defaults; prompts and edits come from a seed the benchmarks do not use."""
    from dreamlite.evaluation.geneval import gen_prompts
    from dreamlite.evaluation.shapes import render
    from dreamlite.evaluation.shapes.world import EDIT_TYPES, sample_edit
    from dreamlite.models.sampler import default_settings, edit, generate

    if n < 1:
        raise DreamliteError(f"--calib: {n} calibration samples; at least 1 is needed")
    s = default_settings(bundle)
    s.seed, s.batch = seed, 4
    if steps:
        s.steps = steps
    rec = _Recorder(bundle.denoiser.session)
    prompts = [p.prompt for p, _ in gen_prompts(max(1, -(-n // 6)), seed + 17)][:n]
    generate(bundle, prompts, s, denoiser=rec)
    if bundle.in_context:
        rng = np.random.default_rng([seed, 29])
        records = [sample_edit(rng, EDIT_TYPES[i % len(EDIT_TYPES)]) for i in range(n)]
        sources = np.stack([render(r.source, bundle.image_size) for r in records])
        edit(bundle, sources, [r.prompt for r in records], s, denoiser=rec)
    return rec.recorded


class _Reader:
    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def quantize_artifact(model: str, out, scheme: str = "w8a16", calib: int = 8, steps: int | None = None,
                      keep_float: tuple[str, ...] = (), seed: int = 0, size: int | None = None, mode: str = "generate",
                      say: Callable[[str], None] | None = None) -> dict:
    """Quantize ``model`` (a model folder or an fp32 artifact) into the artifact folder ``out``."""
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    from dreamlite.models.bundle import load_bundle

    say = say or (lambda _m: None)
    if scheme not in SCHEMES:
        raise DreamliteError(f"--scheme: {scheme!r} is not a scheme QNN runs here (one of {', '.join(SCHEMES)})")
    if calib < 1:
        raise DreamliteError(f"--calib: {calib} calibration samples; at least 1 is needed")
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(model)
        if not (src / MANIFEST).is_file():
            say("export: fp32 ONNX")
            export_artifact(load_bundle(model), Path(tmp) / "fp32", size, mode)
            src = Path(tmp) / "fp32"
        fp32 = load_bundle(str(src))
        if fp32.meta["artifact"]["scheme"] != "fp32":
            raise DreamliteError(f"{model}: already quantized ({fp32.meta['artifact']['scheme']}); quantize the fp32 "
                                 "model or artifact")
        names = _matching_nodes(src / GRAPH, keep_float)  # a bad pattern fails before the slow part
        say(f"calibration: running the sampler ({calib} generations{' and edits' if fp32.in_context else ''})")
        feeds = calibration_feeds(fp32, calib, seed, steps)
        held_out = feeds[1::7] or feeds[:1]
        say(f"quantize: {scheme}, {len(feeds)} recorded denoiser calls")
        pre = Path(tmp) / "pre.onnx"
        act = QuantType.QUInt16 if scheme == "w8a16" else QuantType.QUInt8
        out.mkdir(parents=True, exist_ok=True)
        with _quiet():
            qnn_preprocess_model(str(src / GRAPH), str(pre))
            untie_initializers(pre)
            names = _matching_nodes(pre, keep_float)
            cfg = get_qnn_qdq_config(str(pre), _Reader(feeds), activation_type=act, weight_type=QuantType.QUInt8,
                                     per_channel=True, nodes_to_exclude=names or None)
            quantize(str(pre), str(out / GRAPH), cfg)
        copy_companions(src, out, ("config.json", "dreamlite.json", "text_encoder"))
        base = session(src / GRAPH)
        quant = session(out / GRAPH)
        err = _relative_error(base, quant, held_out)
        manifest = {**fp32.meta["artifact"], "scheme": scheme, "model": model}
        manifest["inputs"], manifest["outputs"] = _io(quant)
        manifest["calibration"] = {"generations": calib, "edits": calib if fp32.in_context else 0,
                                   "denoiser_calls": len(feeds), "steps": steps or "model default", "seed": seed,
                                   "activation_type": act.name, "weight_type": "QUInt8 per-channel",
                                   "kept_float": names}
        manifest["check"] = {"relative_error_vs_fp32": err, "held_out_calls": len(held_out)}
        write_device_kit(out, quant, held_out[0], manifest)
        manifest = seal(out, manifest)
    load_artifact(out)
    return manifest


def untie_initializers(path: Path) -> int:
    """Give every consumer of a shared initializer its own copy; returns how many copies were made.

    The exporter merges equal constants (all-ones LayerNorm gains, all-zero biases of one width) into one initializer
    used by many nodes. The quantizer then needs one scale per use (a bias's scale follows its consumer's input and
    weight scales) and patches the sharing with Cast chains that QNN HTP rejects, together with the LayerNorms that
    read them. Copies cost a few kilobytes."""
    import onnx

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    seen: set[str] = set()
    copies = 0
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name not in inits:
                continue
            if name in seen:
                dup = onnx.TensorProto()
                dup.CopyFrom(inits[name])
                dup.name = f"{name}__{copies}"
                model.graph.initializer.append(dup)
                node.input[k] = dup.name
                copies += 1
            seen.add(name)
    if copies:
        onnx.save_model(model, str(path), save_as_external_data=model.ByteSize() > 2**31 - 2**26,
                        location=f"{path.name}.data")
    return copies


@contextlib.contextmanager
def _quiet(logger: str | None = None):
    """Only errors from ``logger`` (default the root logger) inside the block: ORT's QNN preprocessing and quantizer
    log a warning per unnamed node and per norm weight; neural-compressor logs every graph rewrite."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _matching_nodes(path: Path, patterns: tuple[str, ...]) -> list[str]:
    """Node names of the graph that contain any of ``patterns`` (module paths such as ``conv_out`` or
    ``mid_block.attentions``): kept in float."""
    if not patterns:
        return []
    import onnx

    nodes = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node]
    found = [n for n in nodes if any(p.replace(".", "/") in n or p in n for p in patterns)]
    missing = [p for p in patterns if not any(p.replace(".", "/") in n or p in n for n in nodes)]
    if missing:
        raise DreamliteError(f"--keep-float: no node of the graph matches {missing[0]!r}")
    return found


def _relative_error(base, quant, feeds) -> float:
    num = den = 0.0
    for feed in feeds:
        a, b = base.run(None, feed)[0], quant.run(None, feed)[0]
        num, den = num + float(((a - b) ** 2).mean()), den + float((a ** 2).mean())
    return round((num / max(den, 1e-12)) ** 0.5, 5)
