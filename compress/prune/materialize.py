"""Materialize: write every tensor of the target model (a diffusers ``DreamLiteUNetModel`` built from the target
config) from the kept slices of the teacher's, streamed one tensor at a time. What the teacher has no exact
counterpart for is fitted or initialised, and the report says which:

- separable convolutions: a per-channel SVD fit of the dense 3x3 convolution (rank 1 for the expanding conv, rank 2
  for the contracting one through duplicated hidden channels), weighted by the teacher's input patches when
  calibration statistics are given;
- the sinusoidal time embedding of another width: a least-squares fit over all 1000 timesteps;
- SDXL's six time ids fold exactly into DreamLite's two;
- key/value heads: the mean of the kept heads per shared head (multi-query attention);
- new stage-1 cross-attention layers start as the identity (zero output projection); qk RMSNorm gains start at 1;
  a wider text projection starts as identity-and-zeros.
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn as nn

from dreamlite.io import DreamliteError

from .compensate import Calibration, fold_pruned_inputs, renormalize
from .unet import Plan, TensorSource, dims_of, student_name_to_teacher, teacher_spaces


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


class _Slicer:
    """The kept slices of one teacher tensor, in the student's order: pruned input channels folded into the kept ones
    (and into the bias) where calibration gave their statistics, GroupNorms corrected for the channels their groups
    lost, a wider text projection padded with zero columns."""

    def __init__(self, source: TensorSource, tcfg: dict, plan: Plan, sizes: dict[str, int], calib: Calibration):
        self.source, self.tcfg, self.plan, self.sizes, self.calib = source, tcfg, plan, sizes, calib
        self.folds: dict[str, torch.Tensor] = {}  # module -> what its bias gains from folding its pruned inputs
        self.renormalized: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # GroupNorm -> corrected (gain, bias)

    def __call__(self, tname: str, student_shape: tuple[int, ...]) -> torch.Tensor:
        source, tcfg, calib = self.source, self.tcfg, self.calib
        module, part = tname.rsplit(".", 1)
        if module in calib.norms:  # a GroupNorm: corrected for the channels its groups lost
            index = self.plan.index(dims_of(tname, source.shape(tname), tcfg)[0], self.sizes)
            if len(index) < source.shape(tname)[0]:
                if module not in self.renormalized:  # weight and bias come from one correction
                    self.renormalized[module] = renormalize(source.get(f"{module}.weight"),
                                                            source.get(f"{module}.bias"), index, calib.norms[module])
                return self.renormalized[module][part == "bias"]
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
            index = self.plan.index(names, self.sizes)
            if d == 1 and part == "weight" and module in calib.inputs and len(index) < t.shape[1]:
                t, self.folds[module] = fold_pruned_inputs(t, index, calib.inputs[module])
            else:
                t = t.index_select(d, index)
        if module in calib.inputs:
            if part == "weight":
                self.folds.setdefault(module, 0)  # nothing folded: the bias gains nothing
            elif part == "bias":
                if module not in self.folds:  # the bias came before its weight
                    self(f"{module}.weight", ())
                t = t + self.folds[module]
        return t


def _initial_value(name: str, target: torch.Tensor) -> torch.Tensor:
    """A new tensor's start: new transformer blocks as the identity, a wider text projection as identity-and-zeros,
    RMSNorm gains at 1; anything else keeps the target's fresh initialisation."""
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
    return value


def write_student(source: TensorSource, tcfg: dict, student: nn.Module, plan: Plan,
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
    sliced = _Slicer(source, tcfg, plan, sizes, calib)
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
        w.put(name, _initial_value(name, target), "new")  # nothing in the teacher to inherit

    missing = [n for n in sd if n not in w]
    if missing:
        raise DreamliteError(f"{missing[0]}: no rule wrote this tensor of the target")
    return _report(student, w, sliced, fit_errors, notes, dropped)


def _report(student: nn.Module, w: _Writer, sliced: _Slicer, fit_errors: dict[str, list[float]],
            notes: dict[str, float], dropped: list[str]) -> dict:
    """What materialize did: parameters inherited, fitted and new; mean fit errors; folds and corrections."""
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
    report["folded_inputs"] = len([f for f in sliced.folds.values() if torch.is_tensor(f)])
    report["renormalized_groupnorms"] = len(sliced.renormalized)
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
