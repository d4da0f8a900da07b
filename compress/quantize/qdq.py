"""W8A16 / W8A8 QDQ quantization for Qualcomm QNN, calibrated on what the deployed sampler actually feeds the U-Net.

Calibration runs the project's own sampler (the steps and guidance the model's defaults give) on the fp32 artifact
and records every denoiser call: text-to-image prompts, and for in-context models instruction edits too, at every
step, all guidance branches; every 7th call is held out to measure the artifact. ``calibrate`` takes the activation
ranges a chunk of tensors at a time into ONNX Runtime's calibration cache, and ONNX Runtime's QNN configuration
(``get_qnn_qdq_config``) then places QDQ pairs as QNN wants: 16-bit (W8A16, Qualcomm's choice for Stable Diffusion) or
8-bit (W8A8) activations, 8-bit per-channel conv weights where QNN allows. Modules can stay float or 16-bit by name
(``node_modules``) or by measured sensitivity (``sensitivity.py``); ``inc.py`` is the neural-compressor backend.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from dreamlite.io import DreamliteError
from dreamlite.models.sampler import OrtDenoiser

from .export import SCOPES, input_names
from .artifact import (GRAPH, MANIFEST, _io, copy_companions, export_artifact, load_artifact, random_feed, seal,
                       session, write_device_kit)

SCHEMES = ("w8a16", "w8a8")
CALIB_DATA = ("sampler", "random")
BACKENDS = ("ort", "inc")


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


def random_feeds(manifest: dict, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``n`` Gaussian feeds of the artifact's static shapes, their timesteps spread evenly over the schedule: the
    calibration set of a model that cannot sample (random weights, or a U-Net without its text encoder)."""
    if n < 1:
        raise DreamliteError(f"--calib: {n} calibration samples; at least 1 is needed")
    feeds = [random_feed(manifest, seed + k) for k in range(n)]
    for k, feed in enumerate(feeds):
        feed["timestep"] = np.full_like(feed["timestep"], 1000.0 * (k + 1) / n - 1.0)
    return feeds


class _Reader:
    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def quantize_artifact(model: str, out, scheme: str = "w8a16", calib: int = 8, steps: int | None = None,
                      keep_float: tuple[str, ...] = (), seed: int = 0, size: int | None = None, mode: str = "generate",
                      batch: int | None = None, calib_data: str = "sampler", backend: str = "ort",
                      sensitivity: bool = False, fallback: int = 0, say: Callable[[str], None] | None = None) -> dict:
    """Quantize ``model`` (a model folder or an fp32 artifact) into the artifact folder ``out``.

    ``calib_data``: ``sampler`` records the denoiser calls of ``calib`` generations (and edits); ``random`` uses
    ``calib`` Gaussian feeds (for models that cannot sample, such as a preset with random weights). ``backend``:
    ``ort`` (ONNX Runtime's QNN QDQ configuration) or ``inc`` (Intel Neural Compressor's torch-side static INT8,
    exported to QDQ ONNX; W8A8 only). ``sensitivity``: measure each module's share of the error
    (``sensitivity.scan``) into the manifest; ``fallback``: then keep the ``fallback`` most sensitive modules at
    higher precision (16-bit activations in W8A8, float in W8A16)."""
    from dreamlite.models.bundle import load_bundle

    say = say or (lambda _m: None)
    _check_options(scheme, calib, backend, calib_data, keep_float, sensitivity, fallback)
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        src, fp32, torch_model = _fp32_source(model, Path(tmp), calib_data, keep_float, size, mode, batch, say)
        feeds, held_out = _hold_out(_feeds(fp32, model, calib, calib_data, seed, steps, say))
        say(f"quantize: {scheme} ({backend}), {len(feeds)} recorded denoiser calls")
        out.mkdir(parents=True, exist_ok=True)
        report, chosen = None, []
        if backend == "inc":
            from .inc import export_inc_onnx, inc_int8_module

            torch_model = torch_model or load_bundle(fp32.meta["artifact"]["model"])
            module = inc_int8_module(torch_model, fp32.meta["artifact"]["image_size"], feeds)
            export_inc_onnx(module, feeds[0], input_names(torch_model.unet), out / GRAPH)
            act, weights = "INT8 per-tensor (neural-compressor)", "INT8 per-channel (neural-compressor)"
        else:
            report, chosen = _ort_artifact(src / GRAPH, Path(tmp), out / GRAPH, feeds, held_out, scheme, keep_float,
                                           sensitivity, fallback, say)
            act, weights = ("QUInt16" if scheme == "w8a16" else "QUInt8"), "QUInt8 per-channel"
        copy_companions(src, out, ("config.json", "dreamlite.json", "text_encoder"))
        quant = session(out / GRAPH)
        err = _relative_error(session(src / GRAPH), quant, held_out)
        manifest = {**fp32.meta["artifact"], "scheme": scheme, "model": model}
        manifest["inputs"], manifest["outputs"] = _io(quant)
        manifest["calibration"] = {"data": calib_data, "generations": calib if calib_data == "sampler" else 0,
                                   "edits": calib if fp32.in_context and calib_data == "sampler" else 0,
                                   "denoiser_calls": len(feeds), "steps": steps or "model default", "seed": seed,
                                   "backend": backend, "activation_type": act, "weight_type": weights,
                                   "kept_float": [*keep_float, *(chosen if scheme == "w8a16" else [])],
                                   "kept_16_bit": chosen if scheme == "w8a8" else []}
        manifest["check"] = {"relative_error_vs_fp32": err, "held_out_calls": len(held_out)}
        if report is not None:
            manifest["sensitivity"] = {**report, "fallback": chosen}
        write_device_kit(out, quant, held_out[0], manifest)
        manifest = seal(out, manifest)
    load_artifact(out)
    return manifest


def _fp32_source(model: str, tmp: Path, calib_data: str, keep_float, size, mode, batch, say):
    """The fp32 artifact to quantize: ``model`` itself when it is one, else its export into ``tmp``. Returns its
    folder, its bundle and the torch model (None when ``model`` is an artifact). Bad options fail before the export."""
    from dreamlite.models.bundle import load_bundle

    src, torch_model = Path(model), None
    if not (src / MANIFEST).is_file():
        torch_model = load_bundle(model)
        _check_sampler(torch_model, model, calib_data)  # before the slow export
        say("export: fp32 ONNX")
        export_artifact(torch_model, tmp / "fp32", size, mode, batch)
        src = tmp / "fp32"
    fp32 = load_bundle(str(src))
    if fp32.meta["artifact"]["scheme"] != "fp32":
        raise DreamliteError(f"{model}: already quantized ({fp32.meta['artifact']['scheme']}); quantize the fp32 "
                             "model or artifact")
    if keep_float:  # a module that does not exist fails before the slow part
        import onnx
        graph = onnx.load(str(src / GRAPH), load_external_data=False)
        _matching_nodes(node_modules(graph, graph), keep_float)
    return src, fp32, torch_model


def _hold_out(feeds: list) -> tuple[list, list]:
    """(calibration feeds, held-out feeds): every 7th recorded call checks the result and never calibrates."""
    held = set(range(1, len(feeds), 7)) if len(feeds) > 1 else set()
    held_out = [f for k, f in enumerate(feeds) if k in held] or feeds[:1]
    return [f for k, f in enumerate(feeds) if k not in held], held_out


def _check_options(scheme, calib, backend, calib_data, keep_float, sensitivity, fallback) -> None:
    if scheme not in SCHEMES:
        raise DreamliteError(f"--scheme: {scheme!r} is not a scheme QNN runs here (one of {', '.join(SCHEMES)})")
    if calib < 1:
        raise DreamliteError(f"--calib: {calib} calibration samples; at least 1 is needed")
    if backend not in BACKENDS:
        raise DreamliteError(f"--backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "inc" and (scheme != "w8a8" or keep_float or sensitivity or fallback):
        raise DreamliteError("--backend inc: neural-compressor's static INT8 is W8A8 with every op quantized; "
                             "pass --scheme w8a8 and no --keep-float, --sensitivity or --fallback")
    if fallback < 0:
        raise DreamliteError(f"--fallback: {fallback} modules; give 0 or more")
    if calib_data not in CALIB_DATA:
        raise DreamliteError(f"--calib-data: {calib_data!r} is not one of {', '.join(CALIB_DATA)}")


def _check_sampler(bundle, model: str, calib_data: str) -> None:
    if calib_data == "sampler" and bundle.text is None:
        raise DreamliteError(f"--calib-data: {model} has no text encoder, so the sampler cannot run for "
                             "calibration; pass --calib-data random")


def _feeds(fp32, model: str, calib: int, calib_data: str, seed: int, steps: int | None, say) -> list[dict]:
    """The calibration feeds of the fp32 artifact bundle ``fp32``: the sampler's calls, or Gaussian feeds."""
    if calib_data == "random":
        say(f"calibration: {calib} Gaussian feeds, timesteps across the schedule")
        return random_feeds(fp32.meta["artifact"], calib, seed)
    _check_sampler(fp32, model, calib_data)
    say(f"calibration: running the sampler ({calib} generations{' and edits' if fp32.in_context else ''})")
    return calibration_feeds(fp32, calib, seed, steps)


def _ort_artifact(graph: Path, tmp: Path, out: Path, feeds, held_out, scheme: str, keep_float, sensitivity: bool,
                  fallback: int, say) -> tuple[dict | None, list[str]]:
    """ONNX Runtime's QDQ graph of ``graph`` at ``out``; with ``sensitivity`` or ``fallback``, the module scan and
    the modules that fell back. Returns (scan report or None, fallen-back modules)."""
    pre, cache = tmp / "pre.onnx", tmp / "ranges.json"
    modules = prepare_graph(graph, pre)
    names = _matching_nodes(modules, keep_float) if keep_float else []
    say(f"calibration: activation ranges over {len(feeds)} calls, {calibrate(pre, feeds, cache)} pass(es)")
    ort_qdq(pre, out, cache, scheme, names)
    if not (sensitivity or fallback):
        return None, []
    from . import sensitivity as sens

    report = sens.scan(out, pre, modules, scheme, session(graph), held_out, say=say)
    chosen, nodes = sens.fallback(report, modules, fallback)
    if chosen:
        say(f"fallback: {', '.join(chosen)} at {report['higher_precision']}; quantizing again")
        wide = nodes if scheme == "w8a8" else []
        ort_qdq(pre, out, cache, scheme, names if wide else names + nodes, wide)
    return report, chosen


def prepare_graph(graph: Path, pre: Path) -> dict[str, str]:
    """QNN preprocessing of the exported ``graph`` into ``pre`` (fusions, initializers untied); returns the module
    of every node of ``pre`` (``node_modules``)."""
    import onnx
    from onnxruntime.quantization.execution_providers.qnn import qnn_preprocess_model

    with _quiet():
        if not qnn_preprocess_model(str(graph), str(pre)):  # nothing to fuse: it writes nothing
            shutil.copyfile(graph, pre)
    untie_initializers(pre)
    return node_modules(onnx.load(str(graph), load_external_data=False), onnx.load(str(pre), load_external_data=False))


def calibrate(pre: Path, feeds: list[dict[str, np.ndarray]], cache: Path, budget: int = 2 << 30) -> int:
    """MinMax range of every float activation of the prepared graph ``pre`` over ``feeds``, written as ONNX
    Runtime's calibration cache (``quantize_static(calibration_cache_path=...)``); returns the number of sessions.

    ONNX Runtime's own calibrator keeps every activation of a call alive at once (measured: 2 GB for DreamLite-0.39B at
    256 px, so about 30 GB at 1024 px, which this machine cannot hold). Here the tensors are exposed as outputs in
    chunks of at most ``budget`` bytes per call, one session per chunk, the weights written once beside them."""
    import math

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, save_tensors_data

    work = Path(tempfile.mkdtemp(dir=cache.parent))
    try:
        onnx.shape_inference.infer_shapes_path(str(pre), str(work / "typed.onnx"), data_prop=True)
        model = onnx.load(str(work / "typed.onnx"))
        onnx.save_model(model, str(work / "graph.onnx"), save_as_external_data=True, location="weights.bin")
        (work / "typed.onnx").unlink()
        model = onnx.load(str(work / "graph.onnx"), load_external_data=False)
        graph = model.graph
        info = {v.name: v for v in [*graph.value_info, *graph.output]}
        skip = {i.name for i in graph.initializer} | {o.name for o in graph.output} | {i.name for i in graph.input}
        floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
        names = sorted({t for n in graph.node for t in [*n.input, *n.output] if t in info and t not in skip
                        and info[t].type.tensor_type.elem_type in floats})
        sizes = _tensor_bytes(graph, info)
        chunks: list[list[str]] = [[]]
        size = 0
        for t in names:
            n = sizes[t]
            if chunks[-1] and size + n > budget:
                chunks.append([])
                size = 0
            chunks[-1].append(t)
            size += n
        ranges = {i.name: [min(float(f[i.name].min()) for f in feeds), max(float(f[i.name].max()) for f in feeds)]
                  for i in graph.input if i.name in feeds[0]}  # graph inputs and outputs: from the feeds and runs
        outputs = [copy.deepcopy(o) for o in graph.output]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the tensors as the graph has them
        for chunk in chunks:
            del graph.output[:]
            graph.output.extend(outputs + [info[t] for t in chunk])
            onnx.save_model(model, str(work / "chunk.onnx"))
            sess = ort.InferenceSession(str(work / "chunk.onnx"), opts, providers=["CPUExecutionProvider"])
            out_names = [o.name for o in sess.get_outputs()]
            for feed in feeds:
                for name, value in zip(out_names, sess.run(None, feed)):
                    lo, hi = ranges.get(name, (math.inf, -math.inf))
                    ranges[name] = [min(lo, float(value.min())), max(hi, float(value.max()))]
            del sess
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, {
            k: (np.array([lo], np.float32), np.array([hi], np.float32)) for k, (lo, hi) in ranges.items()}), cache)
        return len(chunks)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tensor_bytes(graph, info: dict) -> dict[str, int]:
    """fp32 bytes of each tensor of ``graph``: from its static shape (``info``: value infos by name), else (inlined
    GroupNorm's reshapes to [N, G, -1]) that of its producer's largest input."""
    import math

    sizes = {}
    for v in [*graph.input, *info.values()]:
        dims = v.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            sizes[v.name] = 4 * math.prod(d.dim_value for d in dims)
    for node in graph.node:
        for t in node.output:
            sizes.setdefault(t, max((sizes.get(i, 0) for i in node.input), default=0))
    return sizes


def ort_qdq(pre: Path, out: Path, cache: Path, scheme: str, float_nodes=(), wide_nodes=()) -> None:
    """ONNX Runtime's QNN QDQ configuration applied to the prepared graph ``pre``, written to ``out``, with the
    activation ranges of the calibration cache ``cache`` (``calibrate``). ``float_nodes`` stay float; the activations
    ``wide_nodes`` write are 16-bit (mixed precision in W8A8; QNN converts between the two widths on the NPU)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_static
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    act = QuantType.QUInt16 if scheme == "w8a16" else QuantType.QUInt8
    wide = set(wide_nodes)
    overrides = {}
    if wide:
        model = onnx.load(str(pre), load_external_data=False)
        consts = {i.name for i in model.graph.initializer}
        overrides = {t: [{"quant_type": QuantType.QUInt16}] for n in model.graph.node if n.name in wide
                     for t in n.output if t not in consts}
    with _quiet(), _linear_graph_edits():
        cfg = get_qnn_qdq_config(str(pre), _Reader([]), activation_type=act, weight_type=QuantType.QUInt8,
                                 per_channel=True, init_overrides=overrides or None,
                                 nodes_to_exclude=list(float_nodes) or None)
        quantize_static(str(pre), str(out), None, calibrate_method=cfg.calibrate_method,
                        quant_format=cfg.quant_format, activation_type=cfg.activation_type,
                        weight_type=cfg.weight_type, op_types_to_quantize=cfg.op_types_to_quantize,
                        nodes_to_exclude=cfg.nodes_to_exclude, per_channel=cfg.per_channel,
                        use_external_data_format=cfg.use_external_data_format, extra_options=cfg.extra_options,
                        calibration_cache_path=cache)


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


def _replace_input_of_all_nodes(self, old_name: str, new_name: str) -> None:
    """``ONNXModel.replace_input_of_all_nodes`` through an index of each tensor's consumers. The quantizer only
    appends nodes while it rewires; a graph that shrank is indexed again."""
    consumers, seen = self.__dict__.setdefault("_dreamlite_consumers", ({}, [0]))
    nodes = self.model.graph.node
    if len(nodes) < seen[0]:
        consumers.clear()
        seen[0] = 0
    for node in nodes[seen[0]:]:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    seen[0] = len(nodes)
    for node in consumers.pop(old_name, []):
        if old_name in node.input:  # an entry may be stale: rewired since by other code
            self.replace_node_input(node, old_name, new_name)
            consumers.setdefault(new_name, []).append(node)


def _find_by_name(name: str, items):
    return next((item for item in items if item.name == name), None)


@contextlib.contextmanager
def _linear_graph_edits():
    """ONNX Runtime's QDQ quantizer rewires each quantized tensor by visiting every input of every node, and finds
    an initializer by listing all of them: quadratic in the graph's size (23 of the 27 s it takes on a tiny
    U-Net). Inside the block the first goes through an index of consumers and the second stops at the first match;
    the graph written is the same (tests/compress/test_artifact.py)."""
    from unittest import mock

    from onnxruntime.quantization import base_quantizer, onnx_model, qdq_quantizer

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(onnx_model.ONNXModel, "replace_input_of_all_nodes",
                                              _replace_input_of_all_nodes))
        for module in (base_quantizer, qdq_quantizer):
            stack.enter_context(mock.patch.object(module, "find_by_name", _find_by_name))
        yield


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


def node_modules(original, graph) -> dict[str, str]:
    """The U-Net module (``down_blocks.1.attentions.0.transformer_blocks.0.attn2``; ``""`` for the U-Net's own ops)
    of every node of ``graph``, a rewrite of the exported ``original`` (ONNX protos). The exporter records each node's
    module in its ``name_scopes`` metadata; rewrites (QNN preprocessing inlines functions and drops metadata) keep the
    tensor names, so a node takes the module of the tensors it writes, else that of the nodes that read its
    outputs (the inner nodes of an inlined function)."""
    tensor_module: dict[str, str] = {}
    for node in original.graph.node:
        scope = next((p.value for p in node.metadata_props if p.key == SCOPES), None)
        if scope:
            # a list literal (literal_eval runs no code): '', the module paths from the root, then the op itself
            paths = [p for p in ast.literal_eval(scope) if p == "unet" or p.startswith("unet.")]
            module = paths[-1][len("unet."):] if paths else ""
            tensor_module.update(dict.fromkeys(node.output, module))
    nodes = list(graph.graph.node)
    out = {n.name: tensor_module[t] for n in nodes for t in n.output if t in tensor_module}
    consumers: dict[str, list] = {}
    for n in nodes:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    for n in reversed(nodes):  # the inner nodes of an inlined function belong where the function's output does
        if n.name not in out:
            owner = next((out[c.name] for t in n.output for c in consumers.get(t, []) if c.name in out), None)
            if owner is not None:
                out[n.name] = owner
    return out


def in_module(module: str, pattern: str) -> bool:
    """``pattern`` names ``module`` or a parent of it (``mid_block.attentions`` covers ``mid_block.attentions.0``)."""
    return module == pattern or module.startswith(pattern + ".")


def _matching_nodes(modules: dict[str, str], patterns: tuple[str, ...]) -> list[str]:
    """Nodes (of ``modules``, from ``node_modules``) inside any of the modules ``patterns`` (such as ``conv_out`` or
    ``mid_block.attentions``): kept in float."""
    found = [n for n, m in modules.items() if any(in_module(m, p) for p in patterns)]
    missing = [p for p in patterns if not any(in_module(m, p) for m in modules.values())]
    if missing:
        raise DreamliteError(f"--keep-float: no node of the graph belongs to module {missing[0]!r}")
    return found


def _relative_error(base, quant, feeds) -> float:
    num = den = 0.0
    for feed in feeds:
        a, b = base.run(None, feed)[0], quant.run(None, feed)[0]
        num, den = num + float(((a - b) ** 2).mean()), den + float((a ** 2).mean())
    return round((num / max(den, 1e-12)) ** 0.5, 5)
