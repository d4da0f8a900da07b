"""Importance criteria (a group of coupled channels in, one score per channel out), from torch-pruning:
magnitude (L2 of the weights), taylor (|weight x gradient| of a loss on calibration batches, as Diff-Pruning),
activation (mean |input| on calibration batches), random (the control)."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn

from dreamlite.io import DreamliteError

FACTORIES: dict[str, Callable[[], object]] = {}  # criterion name -> a torch-pruning importance (the registry)
NEEDS_DATA = ("taylor", "activation")


def criterion(name: str):
    """Register an importance factory under ``name``: ``make_importance`` and ``prune_width`` take it by name (the
    recipe schema and the CLI offer the four built in, ``CRITERIA``)."""
    def register(factory):
        FACTORIES[name] = factory
        return factory
    return register


@criterion("magnitude")
def _magnitude():
    import torch_pruning as tp
    return tp.importance.MagnitudeImportance(p=2)


@criterion("taylor")
def _taylor():
    import torch_pruning as tp
    return tp.importance.TaylorImportance()


@criterion("activation")
class OutputActivationImportance:
    """Mean |output| of each channel of every conv / linear layer in the group, on calibration batches (averaged
    over batches, summed over the coupled layers of a group). torch-pruning's own ActivationImportance reads layer
    inputs and mis-indexes grouped outputs such as GEGLU's two halves; outputs do not have that problem."""

    @contextlib.contextmanager
    def compute_importance(self, model: nn.Module):
        def hook(module, args, out):
            dims = (0, 2, 3) if isinstance(module, nn.Conv2d) else tuple(range(out.dim() - 1))
            act = out.detach().abs().float().mean(dims)
            module._dl_act = getattr(module, "_dl_act", 0) + act
            module._dl_n = getattr(module, "_dl_n", 0) + 1

        hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        from torch_pruning.pruner import function

        n = len(group[0][1])
        total, found = torch.zeros(n), False
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if dep.handler not in (function.prune_conv_out_channels, function.prune_linear_out_channels):
                continue
            if not hasattr(layer, "_dl_act") or any(r is None for r in group[i].root_idxs):
                continue
            act = layer._dl_act / layer._dl_n
            total.scatter_add_(0, torch.tensor(group[i].root_idxs), act[sorted(idxs)])
            found = True
        return total if found else None


@criterion("random")
def _random():
    import torch_pruning as tp
    return tp.importance.RandomImportance()


CRITERIA = tuple(FACTORIES)  # ("magnitude", "taylor", "activation", "random")


def make_importance(name: str):
    if name not in FACTORIES:
        raise DreamliteError(f"importance: unknown criterion {name!r} (expected one of {', '.join(FACTORIES)})")
    return FACTORIES[name]()


def calibrate(importance: str, scorer, model: nn.Module, loop: Callable[[nn.Module], torch.Tensor | None] | None):
    """Run the caller's calibration ``loop(model) -> loss`` as the criterion needs: under activation hooks, or with
    the loss back-propagated for taylor (gradients are summed over the loop's batches)."""
    if importance not in NEEDS_DATA:
        return
    if loop is None:
        raise DreamliteError(f"importance: {importance!r} needs calibration batches (pass calibration data)")
    ctx = scorer.compute_importance(model) if importance == "activation" else contextlib.nullcontext()
    with ctx, torch.set_grad_enabled(importance == "taylor"):
        loss = loop(model)
        if importance == "taylor":
            if loss is None or not loss.requires_grad:
                raise DreamliteError("importance: 'taylor' needs the calibration loop to return a differentiable loss")
            loss.backward()
