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


def _library(model: nn.Module) -> str | None:
    root = type(model).__module__.split(".")[0]
    return root if root in ("diffusers", "transformers") else None


def default_plan(model: nn.Module) -> WidthPlan:
    """GEGLU halves, attention heads (diffusers ``Attention``; transformers attention with q/k/v projections and
    ``num_heads``), and the interface layers of diffusers models (conv_out, the VAE's latent convolutions, the last
    projection) that must keep their width."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention

    plan = WidthPlan()
    for name, module in model.named_modules():
        heads = getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None)
        if isinstance(heads, int) and all(isinstance(getattr(module, k, None), nn.Linear)
                                          for k in ("q_proj", "k_proj", "v_proj")):
            for lin in (module.q_proj, module.k_proj, module.v_proj):
                plan.num_heads[lin] = heads
        if isinstance(module, GEGLU):
            plan.out_channel_groups[module.proj] = 2
        if isinstance(module, Attention):
            for lin in (module.to_q, module.to_k, module.to_v):
                plan.num_heads[lin] = module.heads
        if name.split(".")[-1] in ("conv_out", "quant_conv", "post_quant_conv", "proj_out") and name.count(".") <= 1:
            plan.ignored.append(module)
    return plan


def sync_widths(model: nn.Module) -> None:
    """Write the pruned widths back into the Python ints that diffusers and transformers modules cache (and assert
    on, or reshape with, in forward). Head counts are kept, head dims shrink."""
    from diffusers.models.attention_processor import Attention

    for module in model.modules():
        heads = getattr(module, "num_heads", None)
        if isinstance(heads, int) and isinstance(getattr(module, "q_proj", None), nn.Linear) \
                and hasattr(module, "head_dim"):
            module.head_dim = module.q_proj.out_features // heads
            if hasattr(module, "embed_dim"):
                module.embed_dim = module.q_proj.in_features
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


def run(model, inputs):
    """Call ``model`` with example inputs given as a tensor, a tuple of arguments or a dict of keyword arguments."""
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def tensors(out) -> list[torch.Tensor]:
    """Every floating-point tensor in a model output (tensor, tuple, dict or diffusers/transformers output)."""
    if torch.is_tensor(out):
        return [out] if out.is_floating_point() else []
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    return [t for item in (out if isinstance(out, (tuple, list)) else []) for t in tensors(item)]


def _forward_fn(model, inputs):
    # Every output tensor, so branches such as a pooler are traced too.
    return tensors(run(model, inputs))


def _dependency_graph(model: nn.Module, inputs, plan: WidthPlan):
    import torch_pruning as tp
    return _traced(model, lambda: tp.DependencyGraph().build_dependency(model, inputs, forward_fn=_forward_fn,
                                                                        verbose=False))


def _traced(model: nn.Module, build: Callable):
    """``build()`` traces ``model``; a failure (they come in many types) becomes one line naming model and cause."""
    try:
        return build()
    except Exception as e:
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
    plan = plan or default_plan(model)
    model.eval()
    imp = make_importance(importance)
    pruner = _traced(model, lambda: tp.pruner.MetaPruner(
        model, inputs, importance=imp, pruning_ratio=ratio, ignored_layers=plan.ignored,
        out_channel_groups=plan.out_channel_groups, num_heads=plan.num_heads, prune_head_dims=True,
        prune_num_heads=False, round_to=round_to, forward_fn=_forward_fn))
    calibrate(importance, imp, model, calibration)
    pruner.step()
    model.zero_grad(set_to_none=True)
    sync_widths(model)
    return pruner.pruning_history()


def save_pruned(model: nn.Module, history: list, folder, base: dict | None = None) -> Path:
    """``folder/pruned.safetensors`` + ``folder/pruning.json`` (history and, for diffusers and transformers models,
    the base class and config, so ``load_pruned(folder, inputs)`` needs nothing else). No pickle anywhere."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lib = _library(model)
    if base is None and lib == "diffusers":
        base = {"library": lib, "class": type(model).__name__,
                "config": {k: v for k, v in dict(model.config).items() if not k.startswith("_")}}
    elif base is None and lib == "transformers":
        base = {"library": lib, "class": type(model).__name__, "config": model.config.to_dict()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    with atomic_path(folder / RECORD) as tmp:
        tmp.write_text(json.dumps({"history": history, "base": base}, indent=1))
    return folder


def load_pruned(folder, inputs, base_model: nn.Module | None = None) -> nn.Module:
    """Rebuild the base model (from ``base_model`` or the recorded diffusers class and config), replay the recorded
    pruning on it, and load the pruned weights (strictly)."""
    folder = Path(folder)
    record = read_json(folder / RECORD)
    model = (base_model if base_model is not None else _rebuild(record.get("base") or {}, folder / RECORD)).eval()
    graph = _dependency_graph(model, inputs, WidthPlan())
    graph.load_pruning_history(record["history"])
    sync_widths(model)
    missing, unexpected = model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=False)
    if missing or unexpected:
        raise DreamliteError(f"{folder / WEIGHTS}: does not match the replayed model ({len(missing)} missing, "
                             f"{len(unexpected)} unexpected tensors)")
    return model


def _rebuild(base: dict, where: Path) -> nn.Module:
    """The recorded base model: a diffusers or transformers class (looked up by name in that library only)."""
    lib, name = base.get("library"), base.get("class")
    if lib == "diffusers":
        import diffusers
        cls = getattr(diffusers, str(name), None)
        if cls is not None and hasattr(cls, "from_config"):
            return cls.from_config(base["config"])
    if lib == "transformers":
        import transformers
        cls = getattr(transformers, str(name), None)
        if cls is not None and hasattr(cls, "config_class"):
            return cls(cls.config_class.from_dict(base["config"]))
    raise DreamliteError(f"{where}: no diffusers or transformers base recorded; pass the base model to rebuild")
