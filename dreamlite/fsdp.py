"""FSDP for the training loop (PyTorch's FSDP2, ``fully_shard``), asked for by ``accelerate launch --use_fsdp``.

The trained parameters, their gradients and the optimizer state are split across processes. For the length of
``fit``, each child of the task that holds trained parameters (the student, the feature projections) is replaced by
a sharded copy while the original waits in host memory; at the end the whole tensors are gathered back into the
originals, so callers keep plain modules (sampling, saving, the next phase). Frozen children (a teacher, a text
encoder) are not sharded: every process holds them whole. A task must call its trained children (their forward), not
read their tensors directly: FSDP gathers a unit's parameters only around its forward. Checkpoints and EMA read and
write whole tensors, so a checkpoint written under FSDP is the file one process writes, and either kind of run
resumes the other's.
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import os
import sys
from typing import Iterator

import torch
import torch.nn as nn

from .io import DreamliteError


def fsdp_requested() -> bool:
    """``accelerate launch --use_fsdp`` (it sets ``ACCELERATE_USE_FSDP``)."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_FSDP")


@functools.cache
def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, while it is still whole (registered once).

    Left to interpreter finalisation, gloo's worker threads can still hold the tensors of FSDP's asynchronous
    collectives; freeing them then takes the GIL of a dying interpreter and aborts the process (SIGABRT), which
    fails a run that had finished (seen on CPU under load)."""
    def destroy() -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(destroy)


def end_processes() -> None:
    """End a finished ``accelerate launch`` process: wait for every process, then leave at once (``os._exit(0)``,
    streams flushed). Nothing is left to tear down: the exit skips the interpreter's finalisation and gloo's C++
    destructors, whose worker threads can abort a process that had finished (``terminate called without an active
    exception``, seen once in CI on CPU). Does nothing outside a distributed run; call it last, from the
    program's top level (the CLI, a script), never from library code that a caller goes on after."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind ``t``; for a sharded one this is a collective that every process must call."""
    return t.full_tensor() if _is_sharded(t) else t


def like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``ref``: this process's shard of it when ``ref`` is sharded (no communication: every
    process holds ``full``), else ``full`` itself."""
    if not _is_sharded(ref) or full.shape != ref.shape:
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)


def _units(module: nn.Module) -> list[nn.Module]:
    """What to shard as one unit, innermost first: every block of a ``ModuleList`` (a U-Net's down / up blocks,
    their ResNets and transformer layers), then the module itself for what is left (unless it is only a container,
    which has no forward of its own)."""
    blocks = {id(c) for m in module.modules() if isinstance(m, nn.ModuleList) for c in m}
    inner = [m for m in reversed(list(module.modules())) if id(m) in blocks and any(True for _ in m.parameters())]
    return inner if isinstance(module, (nn.ModuleList, nn.ModuleDict)) else inner + [module]


class Sharded:
    """Within ``with Sharded(task, device):`` the task's trained children are FSDP2-sharded copies;
    ``gather_back(values)`` writes whole tensors into the originals, which the exit puts back in any case."""

    def __init__(self, task: nn.Module, device: torch.device):
        direct = [n for n, p in task.named_parameters(recurse=False) if p.requires_grad]
        if direct:
            raise DreamliteError(f"FSDP: {type(task).__name__} trains a parameter of its own ({direct[0]}); only "
                                 "its submodules can be sharded")
        self.task, self.device = task.to(device), device
        self.originals = {name: child for name, child in task.named_children()
                          if any(p.requires_grad for p in child.parameters())}
        self.units: list[nn.Module] = []

    def __enter__(self) -> "Sharded":
        from torch.distributed.fsdp import fully_shard

        for name, child in self.originals.items():
            twin = copy.deepcopy(child)  # forward hooks (feature taps) come along: they still fill the task's taps
            for unit in _units(twin):
                fully_shard(unit)
                self.units.append(unit)
            setattr(self.task, name, twin)
            child.to("cpu")  # the whole original does not hold device memory while its shards train
        return self

    def __exit__(self, *exc) -> None:
        for name, child in self.originals.items():
            setattr(self.task, name, child.to(self.device))

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradient accumulation: no reduce-scatter until the last micro-batch."""
        for unit in self.units:
            unit.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for unit in self.units:
                unit.set_requires_gradient_sync(True, recurse=False)

    @torch.no_grad()
    def gather_back(self, values: dict[str, torch.Tensor]) -> None:
        """Copy ``values`` (trained tensors by the task's parameter names, sharded or not) whole into the original
        modules. A collective: every process calls it with the same names in the same order."""
        gathered = {k: whole(v) for k, v in values.items()}
        self.__exit__()
        named = dict(self.task.named_parameters())
        for k, v in gathered.items():
            named[k].copy_(v.to(named[k].dtype))
