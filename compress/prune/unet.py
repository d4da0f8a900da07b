"""Derive a DreamLite-layout U-Net from an SDXL-layout one: SDXL (2.57B) -> DreamLite-0.39B, shapes-server ->
shapes-mobile, or any UNet2DConditionModel -> any DreamLiteUNetModel config with the same block skeleton.

The teacher is read one tensor at a time (from a safetensors file, a state dict, or seeded random weights), never
held whole, so pruning SDXL needs the student's memory plus a few teacher tensors. The work is a chain of passes over
a ``Plan`` (what to keep) followed by ``materialize`` (write every student tensor from the kept teacher slices):

- ``depth``: which transformer layers of each attention block survive (SDXL 10 -> 4, mid 10 -> 4), chosen by
  measured importance: the U-Net's output change when a layer is skipped, on calibration batches, or (no data)
  the weight norm of what the layer writes into the residual stream.
- ``width``: which channels of every coupled space survive, where a space is a set of channels that several tensors
  share (a block's residual stream and every skip connection taken from it, a ResNet's hidden channels, a
  transformer's inner width, a feed-forward's hidden units with both GEGLU halves, the time embedding). GroupNorm
  spaces keep the same number of channels in every group, so the student's groups see the teacher's statistics.
- ``heads``: which attention heads survive (SDXL [5, 10, 20] -> DreamLite [4, 8, 14]); keys and values of the kept
  heads are averaged into the student's shared key/value head(s) (multi-query attention).
- ``materialize``: copies everything into the target class. What the teacher has no exact counterpart for is fitted
  or initialised, and the report says which: separable convolutions are a per-channel SVD fit of the dense 3x3
  convolution (rank 1 for the expanding conv, rank 2 for the contracting one through duplicated hidden channels); the
  sinusoidal time embedding of another width is a least-squares fit over all 1000 timesteps; SDXL's six time ids fold
  exactly into DreamLite's two; new stage-1 cross-attention layers start as the identity (zero output projection);
  qk RMSNorm gains start at 1 (or the measured query/key RMS); a wider text projection starts as identity-and-zeros.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from dreamlite.io import DreamliteError

from .compensate import Calibration, fold_pruned_inputs, renormalize

Dims = tuple  # one entry per tensor dim: None (kept whole) or a tuple of space names (concatenated along that dim)


# ------------------------------------------------------------------------------------------------ teacher tensors
class TensorSource:
    """Read-only, name -> float32 tensor, one at a time."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in self._names

    @property
    def _names(self) -> set:
        if not hasattr(self, "_name_set"):
            self._name_set = set(self.keys())
        return self._name_set


class StateDictSource(TensorSource):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self):
        return list(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def get(self, name):
        return self.tensors[name].detach().float().cpu()


class SafetensorsSource(TensorSource):
    """Tensors read lazily from a safetensors file (memory-mapped; nothing is unpickled)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = str(path)
        self._file = safe_open(self.path, "pt")

    def keys(self):
        return list(self._file.keys())

    def shape(self, name):
        return tuple(self._file.get_slice(name).get_shape())

    def get(self, name):
        return self._file.get_tensor(name).float()


class RandomSource(TensorSource):
    """Seeded random weights for a model config, generated per tensor on request (so "random SDXL" never exists
    whole in memory): weights ~ N(0, 1/fan_in), norm gains 1, biases 0."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int = 0):
        self.shapes, self.seed = shapes, seed

    def keys(self):
        return list(self.shapes)

    def shape(self, name):
        return self.shapes[name]

    def get(self, name):
        shape = self.shapes[name]
        if len(shape) == 1:
            return torch.ones(shape) if re.search(r"norm[^.]*\.weight$", name) else torch.zeros(shape)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + sum(name.encode()) * 7919 + len(name))
        return torch.randn(shape, generator=g) / math.sqrt(int(np.prod(shape[1:])))


# -------------------------------------------------------------------------------------------------------- layout
_BLOCK = re.compile(r"^(down_blocks\.(\d+)|mid_block|up_blocks\.(\d+))\.")


def _stream(block: str) -> str:
    return block.replace("_blocks.", "").replace("mid_block", "mid")


def skip_spaces(cfg: dict) -> list[str]:
    """The space of every skip connection, in the order up blocks consume them (last pushed first)."""
    n = len(cfg["block_out_channels"])
    pushed = ["down0"]
    for s in range(n):
        pushed += [f"down{s}"] * cfg["layers_per_block"] + ([f"down{s}"] if s < n - 1 else [])
    return pushed[::-1]


def dims_of(name: str, shape: tuple[int, ...], cfg: dict) -> Dims:
    """The coupled spaces of each dim of one U-Net tensor (teacher naming). The mid block shares the last down
    block's stream (its ResNets have no shortcut); a downsampler's output is the stream it samples."""
    n = len(cfg["block_out_channels"])
    last = f"down{n - 1}"
    rest = (None,) * (len(shape) - 2) if len(shape) > 2 else ()
    m = _BLOCK.match(name)
    if name.startswith("conv_in."):
        return (("down0",),) + (None,) * (len(shape) - 1)
    if name.startswith(("conv_norm_out.", "conv_out.")):
        up = (f"up{n - 1}",)
        if name.startswith("conv_norm_out."):
            return (up,)
        return (None, up) + rest if name.endswith("weight") else (None,)
    if name.startswith("time_embedding."):
        hidden, out = ("temb.hidden",), ("temb",)
        if ".linear_1." in name:
            return (hidden, None) if name.endswith("weight") else (hidden,)
        return (out, hidden) if name.endswith("weight") else (out,)
    if name.startswith("add_embedding."):
        hidden, out = ("add.hidden",), ("temb",)
        if ".linear_1." in name:
            return (hidden, None) if name.endswith("weight") else (hidden,)
        return (out, hidden) if name.endswith("weight") else (out,)
    if m is None:
        return (None,) * len(shape)
    block = m.group(1)
    stream = "mid" if block == "mid_block" else _stream(block)
    space = last if stream == "mid" else stream
    local = name[len(block) + 1:]
    if local.startswith(("downsamplers.", "upsamplers.")):
        return ((space,), (space,)) + rest if name.endswith("weight") else ((space,),)
    r = re.match(r"resnets\.(\d+)\.(.*)$", local)
    if r:
        j, part = int(r.group(1)), r.group(2)
        inner = (f"{block}.resnets.{j}",)
        if block.startswith("up_blocks"):
            u = int(m.group(3))
            hidden = (last if u == 0 else f"up{u - 1}") if j == 0 else f"up{u}"
            into = (hidden, skip_spaces(cfg)[u * (cfg["layers_per_block"] + 1) + j])
        elif block == "mid_block" or j > 0 or m.group(2) == "0":
            into = (space,)
        else:
            into = (f"down{int(m.group(2)) - 1}",)
        out = (space,)
        table = {"norm1": (into,), "conv1": (inner, into), "time_emb_proj": (inner, ("temb",)), "norm2": (inner,),
                 "conv2": (out, inner), "conv_shortcut": (out, into)}
        layer, kind = part.rsplit(".", 1)
        spaces = table[layer]
        return spaces + rest if kind == "weight" else spaces[:1]
    a = re.match(r"attentions\.(\d+)\.(.*)$", local)
    if a:
        attn = f"{block}.attentions.{a.group(1)}"
        part, x = a.group(2), (f"{attn}.x",)
        if part.startswith("norm."):
            return ((space,),)
        if part.startswith("proj_in."):
            return (x, (space,)) + rest if part.endswith("weight") else (x,)
        if part.startswith("proj_out."):
            return ((space,), x) + rest if part.endswith("weight") else ((space,),)
        t = re.match(r"transformer_blocks\.(\d+)\.(.*)$", part)
        if t is None:
            return (None,) * len(shape)
        blk, sub = f"{attn}.transformer_blocks.{t.group(1)}", t.group(2)
        if re.match(r"norm\d\.", sub):
            return (x,)
        q = re.match(r"(attn\d)\.(to_q|to_k|to_v|to_out\.0|norm_q|norm_k)\.(weight|bias)$", sub)
        if q:
            heads = (f"{blk}.{q.group(1)}",)
            proj, kind = q.group(2), q.group(3)
            if proj == "to_out.0":
                return (x, heads) if kind == "weight" else (x,)
            if proj in ("norm_q", "norm_k"):
                return (None,)
            into = ("text",) if (q.group(1) == "attn2" and proj != "to_q") else x
            return (heads, into) if kind == "weight" else (heads,)
        ff = (f"{blk}.ff",)
        if sub.startswith("ff.net.0.proj."):  # GEGLU: [value; gate], both halves indexed by the same hidden units
            return (ff + ff, x) if sub.endswith("weight") else (ff + ff,)
        if sub.startswith("ff.net.2."):
            return (x, ff) if sub.endswith("weight") else (x,)
    return (None,) * len(shape)


@dataclass
class Space:
    size: int  # teacher channels
    groups: int = 1  # GroupNorm groups over these channels: keep the same number in each
    unit: int = 1  # channels per unit (an attention head): keep whole units


def teacher_spaces(source: TensorSource, cfg: dict) -> dict[str, Space]:
    spaces: dict[str, Space] = {}
    groups = cfg.get("norm_num_groups") or 32
    for name in source.keys():
        shape = source.shape(name)
        for d, names in enumerate(dims_of(name, shape, cfg)):
            if names is None:
                continue
            size = shape[d] // len(names) if len(set(names)) == 1 else None
            for s in names:
                if s in spaces or s == "text":
                    continue
                if size is None:
                    continue
                grouped = re.match(r"^(down\d+|up\d+|mid)$", s) or re.search(r"resnets\.\d+$", s)
                head = re.search(r"\.attn\d$", s)
                spaces[s] = Space(size, groups if grouped else 1, _head_dim(cfg, s, size) if head else 1)
    return spaces


def _head_dim(cfg: dict, space: str, width: int) -> int:
    """Channels per head of an attention space (SDXL-style configs give head COUNTS per block)."""
    heads = cfg.get("attention_head_dim") or 8
    if isinstance(heads, (list, tuple)):
        n = len(cfg["block_out_channels"])
        m = _BLOCK.match(space)
        stage = int(m.group(2)) if m.group(2) else n - 1 if m.group(1) == "mid_block" else n - 1 - int(m.group(3))
        heads = heads[stage]
    return width // heads


# ---------------------------------------------------------------------------------------------------- importance
def channel_scores(source: TensorSource, cfg: dict, spaces: dict[str, Space], criterion: str = "magnitude",
                   saliency: dict[str, torch.Tensor] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """One score per channel of every space, summed over every tensor that reads or writes it, streamed one teacher
    tensor at a time: magnitude = sum of w^2, taylor = sum of ``saliency`` (per weight, (w * dL/dw)^2 summed over
    calibration samples: ``target.taylor_saliency``),
    random = uniform noise (the control). Activation scores come from ``target.activation_scores`` instead."""
    if criterion not in ("magnitude", "taylor", "random"):
        raise DreamliteError(f"importance: {criterion!r} cannot be computed from weights (magnitude, taylor, random)")
    if criterion == "taylor" and saliency is None:  # otherwise every score is 0 and the choice is arbitrary
        raise DreamliteError("importance: 'taylor' needs the saliency of calibration batches (target.taylor_saliency)")
    scores = {s: torch.zeros(sp.size) for s, sp in spaces.items()}
    if criterion == "random":
        g = torch.Generator().manual_seed(seed)
        return {s: torch.rand(sp.size, generator=g) for s, sp in spaces.items()}
    for name in source.keys():
        dims = dims_of(name, source.shape(name), cfg)
        if all(d is None for d in dims):
            continue
        if criterion == "taylor":
            if saliency is None or name not in saliency:
                continue
            w = saliency[name]
        else:
            w = source.get(name).pow(2)
        for d, names in enumerate(dims):
            if names is None or any(n not in scores for n in names):
                continue
            per = w.sum(dim=[i for i in range(w.dim()) if i != d]) if w.dim() > 1 else w
            for k, part in enumerate(per.split([spaces[n].size for n in names])):
                scores[names[k]] += part
    return scores


def select(scores: torch.Tensor, keep: int, space: Space) -> torch.Tensor:
    """Indices (sorted) of the ``keep`` best channels: whole units, and the same number in every group."""
    if keep > space.size:
        raise DreamliteError(f"cannot keep {keep} of {space.size} channels")
    if space.unit > 1:
        if keep % space.unit:
            raise DreamliteError(f"{keep} channels is not a whole number of {space.unit}-channel heads")
        per_unit = scores.view(-1, space.unit).sum(1)
        units = per_unit.topk(keep // space.unit).indices.sort().values
        return (units[:, None] * space.unit + torch.arange(space.unit)).flatten()
    g = space.groups
    if g > 1 and keep % g == 0 and space.size % g == 0:
        per = scores.view(g, -1)
        top = per.topk(keep // g, dim=1).indices.sort(dim=1).values
        return (top + torch.arange(g)[:, None] * (space.size // g)).flatten()
    return scores.topk(keep).indices.sort().values


# ---------------------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """What the student keeps of the teacher: per attention block, which transformer layers (teacher indices); per
    space, which channels (teacher indices). Built by the passes, consumed by ``materialize``."""
    layers: dict[str, list[int]] = field(default_factory=dict)
    keep: dict[str, torch.Tensor] = field(default_factory=dict)
    report: list[dict] = field(default_factory=list)

    def index(self, names: tuple[str, ...], sizes: dict[str, int]) -> torch.Tensor:
        parts, offset = [], 0
        for n in names:
            parts.append(self.keep[n] + offset)
            offset += sizes[n]
        return torch.cat(parts)


def transformer_depths(keys: Iterable[str]) -> dict[str, int]:
    """Number of transformer layers of every attention block, from a list of parameter names."""
    depth: dict[str, int] = {}
    for k in keys:
        m = re.match(r"^(.*attentions\.\d+)\.transformer_blocks\.(\d+)\.", k)
        if m:
            depth[m.group(1)] = max(depth.get(m.group(1), 0), int(m.group(2)) + 1)
    return depth


def layer_norm_scores(source: TensorSource, attn: str, depth: int) -> list[float]:
    """Weight-only proxy for a transformer layer's importance: the squared norm of what it writes into the
    residual stream (its attention output projections and the feed-forward's down projection)."""
    out = []
    for b in range(depth):
        total = 0.0
        for part in ("attn1.to_out.0.weight", "attn2.to_out.0.weight", "ff.net.2.weight"):
            name = f"{attn}.transformer_blocks.{b}.{part}"
            if name in source:
                total += float(source.get(name).pow(2).sum())
        out.append(total)
    return out


@torch.no_grad()
def skip_scores(unet: nn.Module, batches: list[dict]) -> dict[str, list[float]]:
    """Measured importance of every transformer layer: the relative change of the U-Net's output on calibration
    batches when the layer is skipped (its input passed through unchanged)."""
    def call():
        return [unet(**b).sample for b in batches]

    reference = call()
    scale = sum(float(r.pow(2).mean()) for r in reference) or 1.0
    out: dict[str, list[float]] = {}
    for name, module in unet.named_modules():
        m = re.match(r"^(.*attentions\.\d+)\.transformer_blocks\.(\d+)$", name)
        if not m:
            continue
        forward = module.forward
        module.forward = lambda hidden_states, *a, **k: hidden_states
        try:
            change = sum(float((o - r).pow(2).mean()) for o, r in zip(call(), reference)) / scale
        finally:
            module.forward = forward
        out.setdefault(m.group(1), []).append(change)
    return out


def depth_pass(plan: Plan, teacher_keys: Iterable[str], student_keys: Iterable[str], source: TensorSource,
               measured: dict[str, list[float]] | None = None) -> Plan:
    """Keep the most important transformer layers of every attention block the student shares with the teacher."""
    t_depth, s_depth = transformer_depths(teacher_keys), transformer_depths(student_keys)
    for attn, n in sorted(s_depth.items()):
        if attn not in t_depth:
            continue
        if n > t_depth[attn]:
            raise DreamliteError(f"{attn}: the target has {n} transformer layers, the teacher only {t_depth[attn]}")
        scores = measured[attn] if measured and attn in measured else layer_norm_scores(source, attn, t_depth[attn])
        kept = sorted(np.argsort(scores)[::-1][:n].tolist())
        plan.layers[attn] = kept
        if n < t_depth[attn]:
            gone = [f"{attn}.transformer_blocks.{b}." for b in range(t_depth[attn]) if b not in kept]
            removed = sum(int(np.prod(source.shape(k))) for k in source.keys() if k.startswith(tuple(gone)))
            plan.report.append({"pass": "depth", "block": attn, "teacher_layers": t_depth[attn], "kept": kept,
                                "parameters_removed": removed,
                                "scores": [round(float(s), 6) for s in scores],
                                "criterion": "skip-output-change" if measured else "write-norm"})
    return plan


def student_name_to_teacher(name: str, plan: Plan) -> str:
    m = re.match(r"^(.*attentions\.\d+)\.transformer_blocks\.(\d+)\.(.*)$", name)
    if m and m.group(1) in plan.layers:
        return f"{m.group(1)}.transformer_blocks.{plan.layers[m.group(1)][int(m.group(2))]}.{m.group(3)}"
    return name


def width_pass(plan: Plan, spaces: dict[str, Space], scores: dict[str, torch.Tensor], targets: dict[str, int],
               criterion: str, heads_criterion: str | None = None) -> Plan:
    """Keep the best channels of every space (heads as whole units), the same number in every GroupNorm group.
    ``criterion`` / ``heads_criterion`` only name what ``scores`` came from, for the report."""
    for s, n in sorted(targets.items()):
        if s not in spaces:
            continue
        try:
            plan.keep[s] = select(scores[s], n, spaces[s])
        except DreamliteError as e:
            raise DreamliteError(f"{s}: {e}") from None
    shrunk = {s: [spaces[s].size, n] for s, n in targets.items() if s in spaces and n < spaces[s].size}
    heads = {s: [t // spaces[s].unit, n // spaces[s].unit] for s, (t, n) in shrunk.items() if spaces[s].unit > 1}
    plan.report.append({"pass": "width", "criterion": criterion,
                        "spaces_pruned": len(shrunk) - len(heads), "channels": {
                            s: v for s, v in shrunk.items() if spaces[s].unit == 1 and re.match(r"^(down|up)\d+$", s)}})
    if heads:
        plan.report.append({"pass": "heads", "criterion": heads_criterion or criterion,
                            "attention_layers_pruned": len(heads),
                            "example": dict(list(heads.items())[:3])})
    return plan


# --------------------------------------------------------------------------------------------------- materialize
def _timestep_features(dim: int, cfg: dict, steps: int = 1000) -> torch.Tensor:
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(torch.arange(steps), dim, flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
                                  downscale_freq_shift=cfg.get("freq_shift", 0))


def _group_layout(k: int, groups: int) -> list[tuple[int, int]]:
    """Hidden channels of an expanded (2x) separable ResNet: (teacher channel position, copy) per student channel,
    each group holding a run of kept channels followed by their copies, so its GroupNorm statistics are the
    teacher's."""
    run = k // groups if groups and k % groups == 0 else k
    return [(j, c) for g in range(k // run) for c in (0, 1) for j in range(g * run, (g + 1) * run)]


def _rank_fit(w: torch.Tensor, rank: int, cov: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per input channel, the best rank-``rank`` factorisation of a dense conv (out, in, kh, kw): depthwise kernels
    (in, rank, kh*kw) and pointwise columns (out, in, rank); and the relative error.

    ``cov``: (in, kh*kw, kh*kw) second moments of each input channel's patches on calibration batches. With it the
    fit minimises the error of the conv's *output* on those inputs (an SVD of the kernel whitened by the patch
    statistics) instead of the kernel's own: feature maps are smooth, so what matters is how a kernel acts on smooth
    patches, which a rank-1 kernel reproduces far better than it reproduces the kernel."""
    out, cin, kh, kw = w.shape
    m = w.permute(1, 0, 2, 3).reshape(cin, out, kh * kw).double()
    if cov is None:
        root = root_inv = torch.eye(kh * kw, dtype=m.dtype).expand(cin, -1, -1)
    else:
        c = cov.double() + 1e-6 * cov.double().diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(kh * kw)
        root = torch.linalg.cholesky(c)  # c = root root^T, so |M p|^2 averaged over patches = |M root|_F^2
        root_inv = torch.linalg.inv(root)
    u, s, vh = torch.linalg.svd(m @ root, full_matrices=False)
    r = min(rank, s.shape[1])
    half = s[:, :r].sqrt()
    depth = (vh[:, :r, :] * half[:, :, None]) @ root_inv  # (in, r, k)
    point = (u[:, :, :r] * half[:, None, :]).permute(1, 0, 2)  # (out, in, r)
    approx = torch.einsum("oir,irk->iok", point, depth)
    err = float(((approx - m) @ root).norm() / (m @ root).norm().clamp_min(1e-12))
    return depth.float(), point.float(), err


class _Writer:
    """Writes the student's tensors in place (no second copy of the student), recording where each came from."""

    def __init__(self, student_sd: dict[str, torch.Tensor]):
        self.target, self.origin, self.numel = student_sd, {}, {}

    def __contains__(self, name: str) -> bool:
        return name in self.origin

    def put(self, name: str, value: torch.Tensor, origin: str):
        want = tuple(self.target[name].shape)
        if tuple(value.shape) != want:
            raise DreamliteError(f"{name}: built {tuple(value.shape)} from the teacher, the target needs {want}")
        with torch.no_grad():
            self.target[name].copy_(value)
        self.origin[name], self.numel[name] = origin, value.numel()


def materialize(source: TensorSource, tcfg: dict, student: nn.Module, plan: Plan,
                pooled_mean: torch.Tensor | None = None, calib: Calibration | None = None) -> dict:
    """Write every tensor of ``student`` (built from the target config, freshly initialised) from the teacher's kept
    slices; see the module docstring for what is fitted or new. With ``calib``, the separable fits are weighted by
    the teacher's input patches and pruned input channels are folded into the kept ones. Returns the report."""
    calib = calib or Calibration()
    scfg = dict(student.config)
    sd = student.state_dict()
    spaces = teacher_spaces(source, tcfg)
    sizes = {s: sp.size for s, sp in spaces.items()}
    w = _Writer(sd)
    fit_errors: dict[str, list[float]] = {"conv1_rank1": [], "conv2_rank2": []}
    dropped: list[str] = []
    notes: dict[str, float] = {}

    folds: dict[str, torch.Tensor] = {}  # module -> what its bias gains from folding its pruned inputs
    renormalized: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # GroupNorm -> corrected (gain, bias)

    def sliced(tname: str, student_shape: tuple[int, ...]) -> torch.Tensor:
        module, part = tname.rsplit(".", 1)
        if module in calib.norms:  # a GroupNorm: corrected for the channels its groups lost
            index = plan.index(dims_of(tname, source.shape(tname), tcfg)[0], sizes)
            if len(index) < source.shape(tname)[0]:
                if module not in renormalized:  # weight and bias come from one correction
                    renormalized[module] = renormalize(source.get(f"{module}.weight"), source.get(f"{module}.bias"),
                                                       index, calib.norms[module])
                return renormalized[module][part == "bias"]
        t = source.get(tname)
        for d, names in enumerate(dims_of(tname, tuple(t.shape), tcfg)):
            if names is None:
                continue
            if names == ("text",):
                if student_shape[d] > t.shape[d]:  # a wider text encoder: new columns start at zero
                    pad = list(t.shape)
                    pad[d] = student_shape[d] - t.shape[d]
                    t = torch.cat([t, t.new_zeros(pad)], dim=d)
                continue
            index = plan.index(names, sizes)
            if d == 1 and part == "weight" and module in calib.inputs and len(index) < t.shape[1]:
                t, folds[module] = fold_pruned_inputs(t, index, calib.inputs[module])
            else:
                t = t.index_select(d, index)
        if module in calib.inputs:
            if part == "weight":
                folds.setdefault(module, 0)  # nothing folded: the bias gains nothing
            elif part == "bias":
                if module not in folds:  # the bias came before its weight
                    sliced(f"{module}.weight", ())
                t = t + folds[module]
        return t

    for name, target in sd.items():
        if name in w:
            continue
        tname = student_name_to_teacher(name, plan)
        sep = re.match(r"^(.*resnets\.\d+)\.conv1\.depthwise\.weight$", name)
        if sep:
            _separable_resnet(sep.group(1), student_name_to_teacher(sep.group(1), plan), source, tcfg, scfg, sd,
                              plan, sizes, sliced, w, fit_errors, dropped, calib.patches)
            continue
        if re.search(r"resnets\.\d+\.(conv1|conv2)\.(depthwise|pointwise)\.weight$", name):
            continue  # written with their conv1.depthwise
        if name.startswith("time_embedding.linear_1.") and tname in source and \
                source.shape("time_embedding.linear_1.weight")[1] != sd["time_embedding.linear_1.weight"].shape[1]:
            if name.endswith("weight"):
                notes["time_embedding_fit_error"] = _fit_time_embedding(source, tcfg, scfg, sd, plan, w)
            continue
        if name.startswith("add_embedding.linear_1.") and tcfg.get("addition_embed_type") == "text_time" and \
                scfg.get("addition_embed_type") == "time":
            if name.endswith("weight"):
                _fold_time_ids(source, tcfg, scfg, plan, w, pooled_mean)
            continue
        mqa = re.match(r"^(.*\.attn\d)\.(to_k|to_v)\.weight$", name)
        if mqa and tname in source:
            t = sliced(tname, tuple(target.shape))
            kv_rows = target.shape[0]
            if kv_rows < t.shape[0]:  # mean of the kept heads, per shared key/value head
                hd = spaces[dims_of(tname, source.shape(tname), tcfg)[0][0]].unit
                t = t.view(kv_rows // hd, -1, hd, t.shape[1]).mean(1).reshape(kv_rows, t.shape[1])
                w.put(name, t, "fitted")
            else:
                w.put(name, t, "inherited")
            continue
        if tname in source:
            w.put(name, sliced(tname, tuple(target.shape)), "inherited")
            continue
        short = re.match(r"^(.*resnets\.\d+)\.conv_shortcut\.weight$", name)
        if short and f"{student_name_to_teacher(short.group(1), plan)}.norm1.weight" in source:
            w.put(name, _identity_shortcut(student_name_to_teacher(short.group(1), plan), source, tcfg, plan, sizes,
                                           target), "inherited")
            continue
        # New parts: nothing in the teacher to inherit.
        value = target.detach().clone()
        if re.search(r"attentions\.\d+\.proj_out\.(weight|bias)$", name):
            value.zero_()  # a new transformer block starts as the identity (its residual adds zero)
        elif name.startswith("encoder_hid_proj.0.weight"):
            value.zero_()
            n = min(value.shape)
            value[:n, :n] = torch.eye(n)  # identity on the teacher's text width, zeros for the rest
        elif name.startswith("encoder_hid_proj.0.bias"):
            value.zero_()
        elif re.search(r"(norm_q|norm_k|encoder_hid_proj\.1)\.weight$", name):
            value.fill_(1.0)
        w.put(name, value, "new")

    missing = [n for n in sd if n not in w]
    if missing:
        raise DreamliteError(f"{missing[0]}: no rule wrote this tensor of the target")
    counts = {k: 0 for k in ("inherited", "fitted", "new")}
    for name, origin in w.origin.items():
        counts[origin] += w.numel[name]
    report = {"pass": "materialize", "class": type(student).__name__, "parameters": counts,
              "new_tensors": sorted({re.sub(r"\.\d+\.", ".N.", n) for n, o in w.origin.items() if o == "new"})[:20],
              "dropped": sorted(set(dropped))}
    for k, v in fit_errors.items():
        if v:
            report[f"{k}_fit_error_mean"] = round(float(np.mean(v)), 4)
    report.update({k: round(v, 6) for k, v in notes.items()})
    report["folded_inputs"] = len([f for f in folds.values() if torch.is_tensor(f)])
    report["renormalized_groupnorms"] = len(renormalized)
    return report


def _separable_resnet(prefix: str, tprefix: str, source, tcfg, scfg, sd, plan, sizes, sliced, w: _Writer,
                      fit_errors, dropped, patch_cov: dict[str, torch.Tensor]):
    inner = dims_of(f"{tprefix}.norm2.weight", (1,), tcfg)[0]
    keep = plan.index(inner, sizes)
    k = len(keep)
    w1 = sliced(f"{tprefix}.conv1.weight", ())  # (k, in, 3, 3)
    b1 = sliced(f"{tprefix}.conv1.bias", ())
    layout = _group_layout(k, scfg.get("norm_num_groups") or 32)
    rows = torch.tensor([j for j, _ in layout])
    into = plan.index(dims_of(f"{tprefix}.conv1.weight", (1, 1), tcfg)[1], sizes)
    cov1 = patch_cov.get(f"{tprefix}.conv1")
    d1, p1, e1 = _rank_fit(w1, 1, None if cov1 is None else cov1[into])
    fit_errors["conv1_rank1"].append(e1)
    w.put(f"{prefix}.conv1.depthwise.weight", d1[:, 0, :].reshape(w1.shape[1], 1, *w1.shape[2:]), "fitted")
    w.put(f"{prefix}.conv1.pointwise.weight", p1[rows, :, 0][..., None, None], "fitted")
    temb_w = sliced(f"{tprefix}.time_emb_proj.weight", ())
    temb_b = source.get(f"{tprefix}.time_emb_proj.bias")[keep] + b1  # conv1's bias folds into the time bias
    w.put(f"{prefix}.time_emb_proj.weight", temb_w[rows], "fitted")
    w.put(f"{prefix}.time_emb_proj.bias", temb_b[rows], "fitted")
    for part in ("weight", "bias"):
        w.put(f"{prefix}.norm2.{part}", sliced(f"{tprefix}.norm2.{part}", ())[rows], "fitted")
    w2 = sliced(f"{tprefix}.conv2.weight", ())  # (out, k, 3, 3)
    cov2 = patch_cov.get(f"{tprefix}.conv2")
    d2, p2, e2 = _rank_fit(w2, 2, None if cov2 is None else cov2[keep])
    fit_errors["conv2_rank2"].append(e2)
    copies = torch.tensor([c for _, c in layout])
    if d2.shape[1] < 2:  # a 1x1 kernel has rank 1: the copy carries nothing
        d2, p2 = torch.cat([d2, torch.zeros_like(d2)], 1), torch.cat([p2, torch.zeros_like(p2)], 2)
    w.put(f"{prefix}.conv2.depthwise.weight", d2[rows, copies].reshape(len(layout), 1, *w2.shape[2:]), "fitted")
    w.put(f"{prefix}.conv2.pointwise.weight", p2[:, rows, copies][..., None, None], "fitted")
    b2 = sliced(f"{tprefix}.conv2.bias", ())
    if f"{prefix}.conv_shortcut.bias" in sd:  # conv2's bias folds into the shortcut's, both add to the output
        shortcut = f"{tprefix}.conv_shortcut.bias"
        w.put(f"{prefix}.conv_shortcut.bias", (sliced(shortcut, ()) if shortcut in source else 0) + b2, "fitted")
    else:
        dropped.append("resnets.conv2.bias (no bias in a separable conv and no shortcut to fold it into)")


def _identity_shortcut(tprefix: str, source, tcfg, plan: Plan, sizes, target: torch.Tensor) -> torch.Tensor:
    """The teacher's identity shortcut as the student's 1x1 conv between two differently pruned spaces: output
    channel o reads input channel i when both keep the same teacher channel."""
    into = dims_of(f"{tprefix}.norm1.weight", (1,), tcfg)[0]
    out = dims_of(f"{tprefix}.conv2.bias", (1,), tcfg)[0]
    src, dst = plan.index(into, sizes), plan.index(out, sizes)
    return (dst[:, None] == src[None, :]).to(target.dtype)[..., None, None]


RIDGE = 1e-2  # relative to the mean feature energy; measured: fit error 0.524 -> 0.512, max |w| 1.9e7 -> 0.33


def _fit_time_embedding(source, tcfg, scfg, sd, plan, w: _Writer) -> float:
    """Least-squares fit of the student's first time-embedding layer on its own sinusoid width to the teacher's
    (kept) pre-activations, over all 1000 training timesteps."""
    rows = plan.keep["temb.hidden"]
    t_w, t_b = source.get("time_embedding.linear_1.weight")[rows], source.get("time_embedding.linear_1.bias")[rows]
    target = _timestep_features(t_w.shape[1], tcfg) @ t_w.T + t_b
    x = _timestep_features(sd["time_embedding.linear_1.weight"].shape[1], scfg)
    x1 = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    # Ridge, not plain least squares: the two sinusoid bases are nearly collinear, and the unregularised solution
    # cancels weights of ~1e7 (same fit error within 0.01, but fp32 ONNX, fp16 and int8 all break on it).
    gram = x1.T @ x1
    ridge = RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    sol = torch.linalg.solve(gram + ridge, x1.T @ target.double()).float()
    w.put("time_embedding.linear_1.weight", sol[:-1].T, "fitted")
    w.put("time_embedding.linear_1.bias", sol[-1], "fitted")
    return float((x1.float() @ sol - target).norm() / target.norm().clamp_min(1e-12))


def _fold_time_ids(source, tcfg, scfg, plan, w: _Writer, pooled_mean):
    """SDXL's ``text_time`` input is [pooled text, 6 time ids (orig h, w, crop top, left, target h, w)]; DreamLite's
    ``time`` input is [h, w]. The teacher is always called with orig = target and crop = 0, so the student's h and w
    columns are the sums of the teacher's two h and two w columns and the crop columns fold into the bias at 0 -
    exact. The pooled text has no counterpart: its mean contribution on calibration captions folds into the bias
    when given, else it is dropped."""
    dim = tcfg["addition_time_embed_dim"]
    rows = plan.keep["add.hidden"]
    tw, tb = source.get("add_embedding.linear_1.weight")[rows], source.get("add_embedding.linear_1.bias")[rows]
    pooled = tw.shape[1] - 6 * dim
    col = [tw[:, pooled + i * dim: pooled + (i + 1) * dim] for i in range(6)]
    n_ids = scfg["projection_class_embeddings_input_dim"] // scfg["addition_time_embed_dim"]
    if n_ids != 2 or scfg["addition_time_embed_dim"] != dim:
        raise DreamliteError(f"add_embedding: cannot map {6} SDXL time ids onto {n_ids} ids of width "
                             f"{scfg['addition_time_embed_dim']} (the target expects DreamLite's h, w)")
    zero = _timestep_features(dim, {"flip_sin_to_cos": True, "freq_shift": 0}, 1)[0]
    bias = tb + col[2] @ zero + col[3] @ zero
    if pooled_mean is not None:
        bias = bias + tw[:, :pooled] @ pooled_mean
    w.put("add_embedding.linear_1.weight", torch.cat([col[0] + col[4], col[1] + col[5]], 1), "fitted")
    w.put("add_embedding.linear_1.bias", bias, "fitted")


def target_sizes(student_sd: dict[str, torch.Tensor], source: TensorSource, tcfg: dict, scfg: dict,
                 plan: Plan) -> dict[str, int]:
    """How many channels of each teacher space the student has, read from the student's own tensor shapes."""
    expand = 2 if scfg.get("use_sep_conv") else 1
    sizes: dict[str, int] = {}

    def need(space: str, n: int, name: str):
        if sizes.setdefault(space, n) != n:
            raise DreamliteError(f"{name}: the target gives {space} {n} channels, another tensor {sizes[space]}")

    for name, t in student_sd.items():
        tname = student_name_to_teacher(name, plan)
        if tname not in source or re.search(r"\.(to_k|to_v)\.weight$", name):
            continue
        for d, names in enumerate(dims_of(tname, source.shape(tname), tcfg)):
            if names is None or "text" in names or len(set(names)) != 1:
                continue
            n = t.shape[d] // len(names)
            if re.search(r"resnets\.\d+$", names[0]):
                n //= expand
            need(names[0], n, name)
    return sizes


# ---------------------------------------------------------------------------------------------------- the whole job
def prune_unet(source: TensorSource, teacher_config: dict, student: nn.Module, criterion: str = "magnitude",
               saliency: dict[str, torch.Tensor] | None = None, measured_depth: dict[str, list[float]] | None = None,
               pooled_mean: torch.Tensor | None = None, seed: int = 0, progress: Callable[[str], None] | None = None,
               scores: dict[str, torch.Tensor] | None = None,
               calib: Calibration | None = None, module_macs: dict[str, int] | None = None,
               heads_criterion: str | None = None) -> list[dict]:
    """Fill ``student`` (a DreamLiteUNetModel built from the target config) from the teacher: depth, width and
    heads passes, then materialize. ``scores``: channel scores per space computed elsewhere (activation statistics,
    or per-pass criteria: ``criterion`` and ``heads_criterion`` then only name them in the report); otherwise
    ``criterion`` scores them from the weights (and ``saliency`` for taylor). ``calib``: the teacher's
    input statistics (``calibration_statistics``) that weight the fits and fold pruned inputs. ``module_macs``: the
    teacher's MACs per module (``macs_per_module``), for MACs after each pass. Returns the per-pass report."""
    say = progress or (lambda _m: None)
    tcfg, scfg = dict(teacher_config), dict(student.config)
    sd = student.state_dict()
    plan = Plan()
    say("depth: choosing transformer layers")
    depth_pass(plan, source.keys(), sd.keys(), source, measured_depth)
    say(f"width and heads: scoring channels ({criterion}{', heads ' + heads_criterion if heads_criterion else ''})")
    spaces = teacher_spaces(source, tcfg)
    scores = scores or channel_scores(source, tcfg, spaces, criterion, saliency, seed)
    targets = target_sizes(sd, source, tcfg, scfg, plan)
    width_pass(plan, spaces, scores, targets, criterion, heads_criterion)
    for name in sd:  # two spaces joined by an identity shortcut in both models must keep the same channels
        m = re.match(r"^(.*resnets\.\d+)\.norm1\.weight$", name)
        if m and f"{m.group(1)}.conv_shortcut.weight" not in sd:
            t = student_name_to_teacher(m.group(1), plan)
            (a,), (b,) = dims_of(f"{t}.norm1.weight", (1,), tcfg)[0], dims_of(f"{t}.conv2.bias", (1,), tcfg)[0]
            if a != b and a in plan.keep and b in plan.keep:
                plan.keep[b] = plan.keep[a]
    for s in spaces:  # spaces the student does not touch keep nothing; spaces it keeps whole keep everything
        plan.keep.setdefault(s, torch.arange(spaces[s].size))
    _count_after_passes(plan, source, tcfg, spaces, module_macs)
    say("materialize: inheriting, fitting and initialising the target's tensors")
    plan.report.append(materialize(source, tcfg, student, plan, pooled_mean, calib))
    plan.report[-1]["parameters_after"] = sum(t.numel() for t in sd.values())
    return plan.report


def _count_after_passes(plan: Plan, source: TensorSource, tcfg: dict, spaces: dict[str, Space],
                        module_macs: dict[str, int] | None) -> None:
    """``parameters_after`` (and ``macs_after`` given the teacher's own MACs per module, ``macs_per_module``) on each
    depth and width/heads report entry: the teacher's layout with the layers and channels kept so far (materialize
    then changes the layout itself). A conv or linear layer's MACs shrink with its weight; attention's own products
    with its query heads."""
    sizes = {s: sp.size for s, sp in spaces.items()}

    def removed(name: str) -> str | None:  # the attention block of a dropped transformer layer
        m = re.match(r"^(.*attentions\.\d+)\.transformer_blocks\.(\d+)(\.|$)", name)
        return m.group(1) if m and m.group(1) in plan.layers and int(m.group(2)) not in plan.layers[m.group(1)] \
            else None

    def kept(name: str) -> tuple[int, int]:  # (kept elements, first-dim fraction numerator) of one teacher tensor
        shape = source.shape(name)
        sizes_kept = [len(plan.index(n, sizes)) if n and n != ("text",) else d
                      for n, d in zip(dims_of(name, shape, tcfg), shape)]
        return int(np.prod(sizes_kept)), sizes_kept[0]

    params = {"teacher": 0, "depth": 0, "width": 0}
    macs = {"teacher": 0.0, "depth": 0.0, "width": 0.0}
    lost: dict[str, list[float]] = {}  # per attention block: parameters and MACs of its dropped layers
    for name in source.keys():
        n = int(np.prod(source.shape(name)))
        params["teacher"] += n
        if block := removed(name):
            lost.setdefault(block, [0, 0.0])[0] += n
            continue
        params["depth"] += n
        params["width"] += kept(name)[0]
    for module, value in (module_macs or {}).items():
        macs["teacher"] += value
        if block := removed(module):
            lost.setdefault(block, [0, 0.0])[1] += value
            continue
        macs["depth"] += value
        if f"{module}.weight" in source:
            macs["width"] += value * kept(f"{module}.weight")[0] / np.prod(source.shape(f"{module}.weight"))
        elif f"{module}.to_q.weight" in source:
            macs["width"] += value * kept(f"{module}.to_q.weight")[1] / source.shape(f"{module}.to_q.weight")[0]
        else:
            macs["width"] += value
    running = [params["teacher"], macs["teacher"]]
    for entry in plan.report:
        if entry["pass"] == "depth":
            gone = lost.get(entry["block"], [0, 0.0])
            running = [running[0] - gone[0], running[1] - gone[1]]
            entry["parameters_after"] = running[0]
            if module_macs:
                entry["macs_after"] = int(running[1])
        elif entry["pass"] in ("width", "heads"):
            entry["parameters_after"] = params["width"]
            if module_macs:
                entry["macs_after"] = int(macs["width"])
