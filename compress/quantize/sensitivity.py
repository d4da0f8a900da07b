"""Per-module quantization sensitivity and automatic fallback, as a quant analyzer does it: quantize the U-Net
once, then for each module put that module alone back to higher precision and measure how much of the error goes
away. The modules that remove the most fall back in the final artifact.

Higher precision is 16-bit activations under W8A8 (mixed precision: every node stays on the NPU) and float under
W8A16. Probes edit the quantized graph instead of quantizing again (ONNX Runtime's quantizer takes about a minute
per U-Net here): a 16-bit probe widens the activations the module reads and writes, keeping each tensor's calibrated
range (scale x 255/65535, zero point x 257); a float probe removes the QDQ pairs on what the module writes and
restores its float weights. Probes estimate; the final artifact is quantized again by ONNX Runtime with the chosen
modules overridden (its QNN rules may widen a few neighbouring tensors too), and its error is measured.
"""
from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np


def module_groups(modules: dict[str, str]) -> dict[str, list[str]]:
    """Node names grouped by the U-Net part they belong to: each down and up block (``down_blocks.1``), the mid
    block's attentions and resnets, and every other top-level module (``conv_in``, ``time_embedding``, ``conv_out``);
    the U-Net's own ops form ``unet``."""
    groups: dict[str, list[str]] = {}
    for node, module in modules.items():
        parts = module.split(".")
        depth = 2 if parts[0] in ("down_blocks", "up_blocks", "mid_block") else 1
        groups.setdefault(".".join(parts[:depth]) or "unet", []).append(node)
    return groups


def widen(model, nodes) -> int:
    """16-bit activations (same calibrated range) for the tensors ``nodes`` read and write, in a quantized graph
    (proto, edited in place); their weights stay 8-bit. Returns how many tensors changed."""
    from onnx import numpy_helper

    nodes = set(nodes)
    graph = model.graph
    dq_input = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    q_input = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    touched = {t for n in graph.node if n.name in nodes for t in n.output}
    touched |= {q_input.get(dq_input.get(t), t) for n in graph.node if n.name in nodes for t in n.input}
    inits = {i.name: i for i in graph.initializer}
    done = set()
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] not in touched or q.input[2] in done:
            continue
        scale, zero = numpy_helper.to_array(inits[q.input[1]]), numpy_helper.to_array(inits[q.input[2]])
        if zero.dtype != np.uint8:
            continue
        inits[q.input[1]].CopyFrom(numpy_helper.from_array((scale * (255 / 65535)).astype(scale.dtype), q.input[1]))
        inits[q.input[2]].CopyFrom(numpy_helper.from_array(zero.astype(np.uint16) * 257, q.input[2]))
        done.add(q.input[2])
    return len(done)


def bypass(model, nodes, floats: dict | None = None) -> int:
    """Float for ``nodes`` in a quantized graph (proto, edited in place): the QDQ pairs on the tensors they write are
    removed and the weights they read go back to float: ``floats[name]`` (the unquantized graph's initializers; ONNX
    Runtime names a quantized weight ``{name}_quantized``), else dequantized. Returns how many DequantizeLinear
    nodes went."""
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = set(nodes)
    inside = [n for n in graph.node if n.name in nodes]
    produced = {t for n in inside for t in n.output}
    reads = {t for n in inside for t in n.input}
    outputs = {o.name for o in graph.output}
    inits = {i.name: i for i in graph.initializer}
    q_input = {q.output[0]: q.input[0] for q in graph.node if q.op_type == "QuantizeLinear" and q.input[0] in produced}
    rename, drop = {}, set()
    for k, dq in enumerate(graph.node):
        if dq.op_type != "DequantizeLinear":
            continue
        if dq.input[0] in q_input and dq.output[0] in outputs:  # the graph's output keeps its name
            graph.node[k].CopyFrom(helper.make_node("Identity", [q_input[dq.input[0]]], [dq.output[0]], dq.name))
        elif dq.input[0] in q_input:  # an activation: its readers take the float tensor
            rename[dq.output[0]] = q_input[dq.input[0]]
            drop.add(k)
        elif dq.input[0] in inits and dq.output[0] in reads:  # a weight of the module: stored dequantized
            w, scale, zero = (numpy_helper.to_array(inits[t]) for t in dq.input[:3])
            value = (floats or {}).get(dq.input[0].removesuffix("_quantized"))
            if value is None or value.shape != w.shape:
                shape = [1] * w.ndim
                if scale.ndim:
                    shape[next((a.i for a in dq.attribute if a.name == "axis"), 1)] = -1
                value = (w.astype(np.float32) - zero.reshape(shape).astype(np.float32)) * scale.reshape(shape)
            graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), dq.output[0]))
            drop.add(k)
    keep = [n for k, n in enumerate(graph.node) if k not in drop]
    for n in keep:
        for k, t in enumerate(n.input):
            n.input[k] = rename.get(t, t)
    used = {t for n in keep for t in n.input} | outputs
    keep = [copy.deepcopy(n) for n in keep if n.op_type != "QuantizeLinear" or n.output[0] in used]
    del graph.node[:]
    graph.node.extend(keep)
    return len(drop)


def scan(quantized: Path, pre: Path, modules: dict[str, str], scheme: str, base, held_out: list,
         say: Callable[[str], None] | None = None) -> dict:
    """{"baseline": relative error of ``quantized`` vs the fp32 session ``base`` on ``held_out`` feeds, "modules":
    [{"module", "nodes", "error" (with that module at higher precision), "gain" (baseline - error)}], most
    sensitive first}. ``pre``: the graph that was quantized; ``modules``: the module of each of its nodes
    (``qdq.node_modules``)."""
    import onnx
    from onnx import numpy_helper

    from .artifact import session
    from .qdq import _relative_error

    say = say or (lambda _m: None)
    baseline = _relative_error(base, session(quantized), held_out)
    groups = module_groups(modules)
    if scheme == "w8a8":
        edit = widen
    else:
        floats = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(pre)).graph.initializer}
        edit = functools.partial(bypass, floats=floats)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, nodes) in enumerate(groups.items()):
            model = onnx.load(str(quantized))
            edit(model, nodes)
            onnx.save(model, str(Path(tmp) / "probe.onnx"))
            e = _relative_error(base, session(Path(tmp) / "probe.onnx"), held_out)
            rows.append({"module": name, "nodes": len(nodes), "error": e, "gain": round(baseline - e, 5)})
            say(f"sensitivity {k + 1}/{len(groups)}: {name} -> {e:.4f} (all quantized {baseline:.4f})")
    return {"baseline": baseline, "held_out_calls": len(held_out),
            "higher_precision": "16-bit activations" if scheme == "w8a8" else "float",
            "modules": sorted(rows, key=lambda r: -r["gain"])}


def fallback(report: dict, modules: dict[str, str], count: int) -> tuple[list[str], list[str]]:
    """(module names, node names) of the ``count`` modules whose fallback removes the most error (only those that
    remove any)."""
    chosen = [r["module"] for r in report["modules"][:count] if r["gain"] > 0]
    groups = module_groups(modules)
    return chosen, [n for m in chosen for n in groups[m]]
