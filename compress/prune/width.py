"""Channel (width) pruning of any ``nn.Module`` through torch-pruning's dependency graph, with the fix-ups diffusers
modules need, and saving without pickle: the pruned weights in safetensors plus the pruning history, replayed onto
a freshly built base model to reload.

What must shrink together (skip concatenations, GroupNorm groups, attention q/k/v/out, GEGLU halves) comes from
torch-pruning's graph; which channels go comes from an importance criterion (``dreamlite.compress.prune.importance``);
how much is the ratio.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from dreamlite.io import DreamliteError, atomic_path, read_json

from .importance import calibrate, make_importance

RECORD = "pruning.json"
WEIGHTS = "pruned.safetensors"


@dataclass
class WidthPlan:
    """Which layers keep their width and how channels are grouped; built for diffusers models automatically."""
    ignored: list[nn.Module] = field(default_factory=list)  # interface layers (e.g. conv_out): widths kept
    out_channel_groups: dict = field(default_factory=dict)  # e.g. GEGLU projections: 2 halves pruned alike
    num_heads: dict = field(default_factory=dict)  # attention q/k/v linears -> head count (heads are kept)


def diffusers_plan(model: nn.Module) -> WidthPlan:
    """GEGLU halves, attention heads, and the interface layers of diffusers models (conv_out, the VAE's latent
    convolutions, the last projection) that must keep their width."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention

    plan = WidthPlan()
    for name, module in model.named_modules():
        if isinstance(module, GEGLU):
            plan.out_channel_groups[module.proj] = 2
        if isinstance(module, Attention):
            for lin in (module.to_q, module.to_k, module.to_v):
                plan.num_heads[lin] = module.heads
        if name.split(".")[-1] in ("conv_out", "quant_conv", "post_quant_conv", "proj_out") and name.count(".") <= 1:
            plan.ignored.append(module)
    return plan


def sync_diffusers(model: nn.Module) -> None:
    """Write the pruned widths back into the Python ints diffusers modules cache (and assert on in forward)."""
    from diffusers.models.attention_processor import Attention

    for module in model.modules():
        conv = getattr(module, "conv", None)
        if hasattr(module, "channels") and isinstance(conv, nn.Conv2d):  # Downsample2D / Upsample2D
            module.channels, module.out_channels = conv.in_channels, conv.out_channels
        if isinstance(module, Attention):
            module.inner_dim = module.to_q.out_features
            module.inner_kv_dim = module.to_k.out_features
            module.query_dim = module.to_q.in_features
            module.out_dim = module.to_out[0].out_features
        for a, b in (("norm1", "conv2"), ("norm", "proj_out")):
            first, last = getattr(module, a, None), getattr(module, b, None)
            if isinstance(first, nn.GroupNorm) and isinstance(last, (nn.Conv2d, nn.Linear)):
                module.in_channels = first.num_channels
                module.out_channels = getattr(last, "out_channels", None) or last.out_features
        if hasattr(module, "inner_dim") and isinstance(getattr(module, "proj_in", None), nn.Linear):
            module.inner_dim = module.proj_in.out_features


def _forward_fn(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs) if isinstance(inputs, (tuple, list)) \
        else model(inputs)
    return _first_tensor(out)


def _first_tensor(out):
    if torch.is_tensor(out):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    for item in out:
        t = _first_tensor(item)
        if t is not None:
            return t
    return None


def _dependency_graph(model: nn.Module, inputs, plan: WidthPlan):
    import torch_pruning as tp
    try:
        return tp.DependencyGraph().build_dependency(model, inputs, forward_fn=_forward_fn, verbose=False)
    except Exception as e:  # tracing failures come in many types; name the model and the cause
        raise DreamliteError(f"{type(model).__name__}: cannot trace the model for pruning "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def prune_width(model: nn.Module, ratio: float, inputs, importance: str = "magnitude",
                calibration: Callable[[nn.Module], torch.Tensor | None] | None = None, plan: WidthPlan | None = None,
                round_to: int | None = None) -> list:
    """Remove ``ratio`` of the channels of every prunable layer group of ``model`` (in place).

    ``inputs``: example inputs (a tensor, tuple, or dict of keyword arguments) used to trace the graph.
    ``calibration``: ``loop(model) -> loss`` over calibration batches (needed by ``taylor`` and ``activation``).
    Returns the pruning history: JSON-serialisable, replayed by ``load_pruned``.
    """
    import torch_pruning as tp

    if not 0 < ratio < 1:
        raise DreamliteError(f"width: ratio {ratio} must be between 0 and 1 (the fraction of channels removed)")
    is_diffusers = type(model).__module__.startswith("diffusers")
    plan = plan or (diffusers_plan(model) if is_diffusers else WidthPlan())
    model.eval()
    imp = make_importance(importance)
    try:
        pruner = tp.pruner.MetaPruner(model, inputs, importance=imp, pruning_ratio=ratio, ignored_layers=plan.ignored,
                                      out_channel_groups=plan.out_channel_groups, num_heads=plan.num_heads,
                                      prune_head_dims=True, prune_num_heads=False, round_to=round_to,
                                      forward_fn=_forward_fn)
    except DreamliteError:
        raise
    except Exception as e:
        raise DreamliteError(f"{type(model).__name__}: cannot trace the model for pruning "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    calibrate(importance, imp, model, calibration)
    pruner.step()
    model.zero_grad(set_to_none=True)
    if is_diffusers:
        sync_diffusers(model)
    return pruner.pruning_history()


def save_pruned(model: nn.Module, history: list, folder, base: dict | None = None) -> Path:
    """``folder/pruned.safetensors`` + ``folder/pruning.json`` (history and, for diffusers models, the base class and
    config so ``load_pruned(folder)`` needs nothing else). No pickle anywhere."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if base is None and hasattr(model, "config") and type(model).__module__.startswith("diffusers"):
        base = {"class": type(model).__name__, "config": {k: v for k, v in dict(model.config).items()
                                                          if not k.startswith("_")}}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    with atomic_path(folder / RECORD) as tmp:
        tmp.write_text(json.dumps({"history": history, "base": base}, indent=1))
    return folder


def load_pruned(folder, inputs, base_model: nn.Module | None = None) -> nn.Module:
    """Rebuild the base model (from ``base_model`` or the recorded diffusers class and config), replay the recorded
    pruning on it, and load the pruned weights (strictly)."""
    import diffusers

    folder = Path(folder)
    record = read_json(folder / RECORD)
    if base_model is None:
        base = record.get("base") or {}
        name = base.get("class")
        if not name or not hasattr(diffusers, name):
            raise DreamliteError(f"{folder / RECORD}: no diffusers base recorded; pass the base model to rebuild")
        base_model = getattr(diffusers, name).from_config(base["config"])
    model = base_model.eval()
    graph = _dependency_graph(model, inputs, WidthPlan())
    graph.load_pruning_history(record["history"])
    if type(model).__module__.startswith("diffusers"):
        sync_diffusers(model)
    missing, unexpected = model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=False)
    if missing or unexpected:
        raise DreamliteError(f"{folder / WEIGHTS}: does not match the replayed model ({len(missing)} missing, "
                             f"{len(unexpected)} unexpected tensors)")
    return model
