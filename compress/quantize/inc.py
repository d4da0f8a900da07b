"""Torch-side INT8 through Intel Neural Compressor (3.x, PT2E static quantization): the comparison to ONNX Runtime's
QDQ quantizer. INC calibrates and converts the torch U-Net on the same sampler-recorded denoiser feeds as the ONNX
path (``calibration_feeds``); the converted graph (``quantize_per_channel`` / ``dequantize_per_tensor`` around each
op) is then exported to ONNX, where those ops become QuantizeLinear / DequantizeLinear pairs, and its weights are
stored as int8. The result is an ordinary QDQ artifact: no pickle, the same manifest, ``qnn-check`` and benches.

Optional dependency: ``pip install -e '.[inc]' -c constraints.txt``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dreamlite.io import DreamliteError

from .export import UNetGraph, export_graph, input_names


def inc_int8_module(bundle, image_size: tuple[int, int], feeds: list[dict[str, np.ndarray]]) -> torch.nn.Module:
    """INC's default ``StaticQuantConfig`` (int8 weights per output channel, int8 activations per tensor) applied to
    ``bundle``'s U-Net, calibrated on ``feeds`` (artifact input names -> arrays)."""
    try:
        from neural_compressor.torch.export import export
        from neural_compressor.torch.quantization import StaticQuantConfig, convert, prepare
    except ImportError:
        raise DreamliteError("--backend inc: neural-compressor is not installed "
                             "(pip install -e '.[inc]' -c constraints.txt)") from None
    from .qdq import _quiet

    if not feeds:
        raise DreamliteError("--calib: no calibration feeds for neural-compressor")
    unet = bundle.unet.float().eval()
    names = input_names(unet)
    graph = UNetGraph(unet, *image_size).eval()
    with _quiet("neural_compressor"):
        prepared = prepare(export(graph, tuple(torch.from_numpy(feeds[0][n]) for n in names)), StaticQuantConfig())
        with torch.no_grad():
            for feed in feeds:
                prepared(*[torch.from_numpy(feed[n]) for n in names])
        return convert(prepared)


def export_inc_onnx(module: torch.nn.Module, feed: dict[str, np.ndarray], names: list[str], path) -> Path:
    """Export INC's converted module to a QDQ ONNX graph at ``path`` (opset 21, the shapes of ``feed``), its
    quantized weights folded into int8 initializers."""
    args = tuple(torch.from_numpy(feed[n]) for n in names)
    return export_graph(module, args, names, path, "the neural-compressor INT8 U-Net",
                        rewrite=fold_constant_quantization)


def fold_constant_quantization(model) -> int:
    """Store quantized weights as integers: every QuantizeLinear whose inputs are all initializers (and a Clip to the
    integer range after it, as torch's ``quantize_per_channel`` exports) becomes one integer initializer feeding its
    DequantizeLinear. Returns how many QuantizeLinear nodes were folded. Numerics are unchanged: ONNX's
    QuantizeLinear rounds half to even and saturates, as here."""
    from onnx import numpy_helper

    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    folded: dict[str, np.ndarray] = {}
    dropped = []
    for node in graph.node:
        args = [folded.get(n, consts.get(n)) if n else None for n in node.input]
        if node.op_type == "QuantizeLinear" and len(args) == 3 and all(a is not None for a in args):
            x, scale, zero = args
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * x.ndim
            if scale.ndim:
                shape[axis] = -1
            info = np.iinfo(zero.dtype)
            q = np.rint(x / scale.reshape(shape)) + zero.reshape(shape).astype(np.int64)
            folded[node.output[0]] = np.clip(q, info.min, info.max).astype(zero.dtype)
        elif node.op_type == "Clip" and node.input[0] in folded and all(a is not None for a in args[1:]):
            low, high = (args[k] if len(args) > k and args[k] is not None else None for k in (1, 2))
            folded[node.output[0]] = np.clip(folded[node.input[0]], low, high).astype(folded[node.input[0]].dtype)
        else:
            continue
        dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    for name, value in folded.items():
        if name in used:
            graph.initializer.append(numpy_helper.from_array(value, name))
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return sum(n.op_type == "QuantizeLinear" for n in dropped)
