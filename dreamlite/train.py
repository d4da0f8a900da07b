"""The one training loop: Hugging Face Accelerate, EMA, atomic checkpoints with exact resume, CSV log, loss curve.

A *task* is an ``nn.Module`` whose ``forward(**batch)`` returns ``(loss, logs)``; it owns the models it trains. The
batch for step ``k`` is a pure function ``batches(k)`` of the run's seed and ``k`` (the *global* batch, noise
included), and each process takes its slice of it, so one process and N processes see the same samples and a resumed
run replays exactly what an uninterrupted one would. Because it is a pure function, a DataLoader worker can draw the
next batches while the current step trains (``workers``), and the samples are the same either way.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import multiprocessing
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import safe_open
from safetensors.torch import save_file

from .fsdp import Sharded, destroy_process_group_at_exit, fsdp_requested, like, whole
from .io import DreamliteError, DreamliteWarning, atomic_path, identity_track
from .precision import warn_if_bf16_slow

CHECKPOINT = "checkpoint.safetensors"
LOG = "train_log.csv"
MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # what mpirun sets (accelerate reads them)
UNSUPPORTED_LAUNCH = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


class TrainSettings(BaseModel):
    """Optimisation settings shared by every training stage (AdamW, warmup then constant or cosine decay)."""
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(ge=1)
    batch: int = Field(32, ge=1, description="global batch per optimizer step")
    accumulate: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(5e-4, gt=0)
    warmup: int = Field(200, ge=0)
    decay: Literal["constant", "cosine"] = "cosine"
    final_lr: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of lr (cosine)")
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema: float = Field(0.999, ge=0, lt=1, description="EMA decay (0 = no EMA)")
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    workers: int = Field(0, ge=0, le=8, description="DataLoader processes drawing the next batches (0: in the loop)")

    @model_validator(mode="after")
    def _divisible(self):
        if self.batch % self.accumulate:
            raise ValueError(f"batch {self.batch} is not divisible by accumulate {self.accumulate}")
        return self


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup over ``s.warmup`` steps, then constant or cosine decay to ``s.final_lr * s.lr``."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    if s.decay == "constant":
        return s.lr
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.final_lr + (1 - s.final_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class EMA:
    """Exponential moving average of named parameters, warmed up as ``min(decay, (1 + t) / (10 + t))``."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - d)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        named = dict(module.named_parameters())
        for k, v in self.shadow.items():
            named[k].copy_(v.to(named[k].dtype))


def split(batch: dict, index: int, parts: int) -> dict:
    """Slice ``index`` of ``parts`` along dim 0 of every tensor and list in ``batch``."""
    out = {}
    for k, v in batch.items():
        n = len(v)
        if n % parts:
            raise DreamliteError(f"batch: {n} samples do not split into {parts} equal parts (batch / accumulate / "
                                 "processes must be whole)")
        size = n // parts
        out[k] = v[index * size:(index + 1) * size]
    return out


_FAILED = "__dreamlite_error__"


class _StepBatches(torch.utils.data.Dataset):
    """Step ``k`` -> ``batches(k)``, read by a DataLoader worker. A ``DreamliteError`` (bad data on disk) comes back
    as its one line: the DataLoader would re-raise it with the worker's traceback folded into the message."""

    def __init__(self, batches: Callable[[int], dict]):
        self.batches = batches

    def __getitem__(self, step: int) -> dict:
        try:
            return self.batches(step)
        except DreamliteError as e:
            return {_FAILED: str(e)}


def batch_stream(batches: Callable[[int], dict], steps: range, workers: int) -> Iterator[dict]:
    """``batches(k)`` for each ``k`` in ``steps``, in order; with ``workers`` > 0 drawn ahead by forked DataLoader
    processes (one thread each) while the caller trains. ``batches`` need not pickle: the workers are forked.
    Where fork is not available (Windows, macOS's default), or with 0 workers, batches are drawn in the caller."""
    if workers == 0 or "fork" not in multiprocessing.get_all_start_methods():
        yield from map(batches, steps)
        return
    loader = torch.utils.data.DataLoader(_StepBatches(batches), sampler=steps, batch_size=None, num_workers=workers,
                                         prefetch_factor=2, multiprocessing_context="fork",
                                         generator=torch.Generator().manual_seed(0))  # not the global RNG
    for batch in loader:
        if _FAILED in batch:
            raise DreamliteError(batch[_FAILED])
        yield batch


def _trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p for k, p in module.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, step: int, task: nn.Module, opt: torch.optim.Optimizer, ema: EMA | None,
                    write: bool = True) -> None:
    """Whole tensors of what is trained (a frozen teacher or text encoder is not copied into every checkpoint).
    Sharded tensors are gathered, so under FSDP every process calls this and only the one with ``write`` writes."""
    tensors: dict[str, torch.Tensor] = {}

    def keep(name: str, v) -> None:  # a process that does not write gathers its part and drops the whole tensor
        v = whole(v.detach()) if torch.is_tensor(v) else torch.tensor(v)
        if write:
            tensors[name] = v.contiguous().cpu()

    for k, v in _trainable(task).items():
        keep(f"model.{k}", v)
    for k, v in (ema.shadow if ema is not None else {}).items():
        keep(f"ema.{k}", v)
    state = opt.state_dict()
    for i, st in state["state"].items():
        for k, v in st.items():
            keep(f"optim.{i}.{k}", v)
    if not write:
        return
    meta = {"step": str(step), "param_groups": json.dumps(state["param_groups"])}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_checkpoint(path: Path, task: nn.Module, opt: torch.optim.Optimizer, ema: EMA | None) -> int:
    """Restore everything ``save_checkpoint`` wrote (each process takes its shard of a sharded tensor); returns the
    step to continue from."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    params = _trainable(task)
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = set(params) - set(model), set(model) - set(params)
    resized = [k for k in set(params) & set(model) if params[k].shape != model[k].shape]
    if missing or unexpected or resized:
        raise DreamliteError(f"{path}: checkpoint does not match the model being trained ({len(missing)} missing, "
                             f"{len(unexpected)} unexpected, {len(resized)} resized tensors); use --restart")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(like(model[k], p))
    if ema is not None:
        ema.shadow = {k[4:]: like(v, params.get(k[4:], v)) for k, v in tensors.items() if k.startswith("ema.")}
    order = [p for g in opt.param_groups for p in g["params"]]
    state: dict = {"state": {}, "param_groups": json.loads(meta["param_groups"])}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = like(v, order[int(i)])
    opt.load_state_dict(state)
    return int(meta["step"])


def _truncate_log(path: Path, step: int) -> None:
    if not path.is_file():
        return
    rows = list(csv.reader(path.open()))
    keep = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= step]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        csv.writer(f).writerows(keep)


# --------------------------------------------------------------------------------------------------- the loop
def check_launch() -> None:
    """Refuse launch modes the loop does not drive (``accelerate launch`` with DeepSpeed or Megatron-LM) before
    anything is loaded, and say so when ``--cpu`` asked for processes that were not started. FSDP (``--use_fsdp``)
    is driven by the loop itself (``dreamlite.fsdp``)."""
    from accelerate.utils import parse_flag_from_env

    for var, name in UNSUPPORTED_LAUNCH.items():
        if parse_flag_from_env(var):
            raise DreamliteError(f"accelerate: {name} is not supported by the training loop; launch with FSDP "
                                 "(--use_fsdp), DDP (--multi_gpu) or one process")
    if cpu_launch_started_one_process():
        warnings.warn("accelerate launch --cpu asked for several processes and started one (accelerate starts CPU "
                      "processes only through mpirun, with --mpirun_hostfile): this run trains the whole global "
                      f"batch in one process (the same samples and losses) on {torch.get_num_threads()} thread(s); "
                      "for N processes on CPU use accelerate launch --multi_gpu --num_processes N (gloo)",
                      DreamliteWarning, stacklevel=2)


def cpu_launch_started_one_process() -> bool:
    """``accelerate launch --cpu --num_processes N`` (N > 1) without an MPI hostfile: accelerate sets the rendezvous
    address (and OMP_NUM_THREADS) for N processes, then starts one, without WORLD_SIZE or an MPI rank count."""
    from accelerate.utils import parse_flag_from_env

    env = os.environ
    return (parse_flag_from_env("ACCELERATE_USE_CPU") and "MASTER_ADDR" in env and "WORLD_SIZE" not in env
            and not any(k in env for k in MPI_SIZE_VARS))


def fit(task: nn.Module, batches: Callable[[int], dict], s: TrainSettings, folder, track=identity_track,
        log: Callable[[str], None] = print, description: str = "train") -> dict:
    """Train ``task`` for ``s.steps`` optimizer steps, resuming from ``folder/checkpoint.safetensors`` if present.

    Under ``accelerate launch --use_fsdp`` with several processes the trained modules are sharded (FSDP2) while
    training. At the end the task's trained parameters hold the EMA (or raw) weights, whole; returns a summary.
    """
    from accelerate import Accelerator

    check_launch()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # bf16 is our own autocast (``_backward``), as the recipe says: Accelerate's mixed_precision is fixed for the life
    # of the process (a second fit() with another precision, the next phase or stage, would be refused), and left
    # unset it would follow `accelerate launch --mixed_precision` instead of the recipe
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    warn_if_bf16_slow(s.precision, acc.device.type, "train.precision")
    if acc.num_processes > 1:
        destroy_process_group_at_exit()
    parts = s.accumulate * acc.num_processes
    if s.batch % parts:
        raise DreamliteError(f"batch: {s.batch} is not divisible by accumulate x processes = {parts}")
    sharded = Sharded(task, acc.device) if fsdp_requested() and acc.num_processes > 1 else None
    if sharded is not None and acc.is_main_process:
        log(f"      FSDP2: {', '.join(sharded.originals)} sharded over {acc.num_processes} processes")
    with sharded or contextlib.nullcontext():
        return _loop(acc, task, sharded, batches, s, folder, track, log, description)


def _loop(acc, task: nn.Module, sharded: Sharded | None, batches, s: TrainSettings, folder: Path, track, log,
          description: str) -> dict:
    params = _trainable(task)
    opt = torch.optim.AdamW(params.values(), lr=s.lr, weight_decay=s.weight_decay)
    ema = EMA(params, s.ema) if s.ema > 0 else None
    ckpt, log_path = folder / CHECKPOINT, folder / LOG
    start = load_checkpoint(ckpt, task, opt, ema) if ckpt.is_file() else 0
    if start and acc.is_main_process:
        log(f"      resuming at step {start} from {ckpt}")
    _truncate_log(log_path, start)
    if sharded is None:
        model, opt = acc.prepare(task, opt)  # DDP when launched with several processes
        no_sync = lambda: acc.no_sync(model)  # noqa: E731
        clip = lambda: acc.clip_grad_norm_(model.parameters(), s.grad_clip)  # noqa: E731
    else:  # the gradients are reduce-scattered by FSDP's own hooks
        model, no_sync = task, sharded.no_sync
        clip = lambda: torch.nn.utils.clip_grad_norm_(list(params.values()), s.grad_clip)  # noqa: E731
    unwrapped = acc.unwrap_model(model)
    params = _trainable(unwrapped)
    recent: list[float] = []
    t0, seen = time.perf_counter(), 0
    window = (t0, 0)  # the speed shown is over the last log interval, not since the start
    with contextlib.closing(batch_stream(batches, range(start, s.steps), s.workers)) as stream:
        for step in track(range(start, s.steps), total=s.steps - start, description=description):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, s)
            batch = split(next(stream), acc.process_index, acc.num_processes)
            logs = _mean_over_processes(acc, _backward(model, batch, s.accumulate, acc, no_sync, s.precision))
            if not math.isfinite(logs["loss"]):  # every process sees the mean, so all stop together
                raise DreamliteError(f"{description}: loss is {logs['loss']} at step {step}; stopped, the last good "
                                     f"checkpoint is {ckpt if ckpt.is_file() else 'none (no checkpoint yet)'}")
            clip()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(params, step)
            seen += s.batch
            recent = (recent + [logs["loss"]])[-s.log_every:]
            done = step + 1
            if done % s.log_every == 0 or done == s.steps:
                now = time.perf_counter()
                rate = (seen - window[1]) / max(1e-9, now - window[0])
                window = (now, seen)
                _append_log(log_path, done, lr_at(step, s), rate, logs, acc.is_main_process)
                if acc.is_main_process:
                    log(f"      step {done}/{s.steps}  loss {sum(recent) / len(recent):.4f}  {rate:.0f} samples/s")
            if done % s.checkpoint_every == 0 or done == s.steps:
                acc.wait_for_everyone()
                if sharded is not None or acc.is_main_process:  # gathering shards takes every process
                    save_checkpoint(ckpt, done, unwrapped, opt, ema, write=acc.is_main_process)
    if sharded is not None:
        sharded.gather_back(ema.shadow if ema is not None else params)
    elif ema is not None:
        ema.copy_to(unwrapped)
    if acc.is_main_process and log_path.is_file():
        plot_loss(log_path, folder / "loss.png")
    final = sum(recent) / len(recent) if recent else _last_logged_loss(log_path)
    return {"steps": s.steps, "final_loss": round(final, 5) if final is not None else None,
            "samples_per_s": round(seen / max(1e-9, time.perf_counter() - t0), 1) if seen else None}


def _backward(model, batch: dict, accumulate: int, acc, no_sync, precision: str) -> dict[str, torch.Tensor]:
    """Forward (under bf16 autocast if asked) and backward over ``accumulate`` micro-batches of this process's
    ``batch``; returns the logs' means. Gradients are synchronised once, on the last micro-batch."""
    logs: dict[str, torch.Tensor] = {}
    for m in range(accumulate):
        sync = contextlib.nullcontext() if m == accumulate - 1 else no_sync()
        with sync, torch.autocast(acc.device.type, torch.bfloat16, enabled=precision == "bf16"):
            loss, parts_log = model(**split(batch, m, accumulate))
        acc.backward(loss.float() / accumulate)
        for k, v in {"loss": loss.detach(), **parts_log}.items():
            logs[k] = logs.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32) / accumulate
    return logs


def _last_logged_loss(path: Path) -> float | None:
    """The loss of the last row of a CSV log (a run resumed after its last step trains nothing)."""
    rows = list(csv.DictReader(path.open())) if path.is_file() else []
    return float(rows[-1]["loss"]) if rows else None


def _mean_over_processes(acc, logs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each logged value averaged over processes (equal shares of the global batch), so N processes log what one
    process with the same global batch would."""
    if acc.num_processes == 1:
        return {k: float(v) for k, v in logs.items()}
    stacked = acc.reduce(torch.stack(list(logs.values())).to(acc.device), reduction="mean")
    return {k: float(v) for k, v in zip(logs, stacked)}


def _append_log(path: Path, step: int, lr: float, rate: float, logs: dict, main: bool) -> None:
    if not main:
        return
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["step", "lr", "samples_per_s", *logs])
        w.writerow([step, f"{lr:.3e}", f"{rate:.1f}", *(f"{v:.5f}" for v in logs.values())])


def plot_loss(log_path: Path, png: Path) -> None:
    """The loss curve of a CSV log as a PNG (matplotlib, headless)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(log_path.open()))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [int(r["step"]) for r in rows]
    curves = {k: [float(r[k]) for r in rows] for k in rows[0] if k not in ("step", "lr", "samples_per_s")}
    for key, values in curves.items():
        ax.plot(steps, values, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(v > 0 for values in curves.values() for v in values):  # a policy-gradient loss is signed: linear then
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
