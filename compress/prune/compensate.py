"""What the pruned channels leave behind, compensated from calibration statistics of the teacher.

- ``fold_pruned_inputs``: a layer that reads a pruned space gets the removed channels' contribution folded into the
  kept ones, by their ridge-regression prediction from the kept channels (channel reconstruction: He et al. 2017,
  ThiNet).
- ``renormalize``: a GroupNorm whose groups lost channels computes its mean and variance over the kept channels
  only; its affine parameters are corrected so that it still outputs what the teacher's did on calibration data.
  Without this, a criterion that drops a group's dominant channel multiplies the group's other channels by the ratio
  of the standard deviations (3.6x in the shapes teacher's last up stage, where one channel in four carries about 90%
  of each group's energy; docs/pruning.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass
class Calibration:
    """What materialize is weighted by, measured on the teacher over calibration batches.

    ``patches``: per ResNet 3x3 conv, second moments (in, 9, 9) of each input channel's patches (the separable fits).
    ``inputs``: per Conv2d / Linear, second moments (in+1, in+1) of its input channels and a constant 1 (the
    compensation of pruned input channels).
    ``norms``: per GroupNorm, its ``groups`` and ``eps``, and per calibration sample and channel the ``mean`` and
    mean square (``sq``) of its input over positions, each (samples, C) (``renormalize``)."""
    patches: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    norms: dict[str, dict] = field(default_factory=dict)


@torch.no_grad()
def calibration_statistics(unet: nn.Module, batches: list[dict], max_inputs: int = 4096) -> Calibration:
    """One pass of the teacher over calibration batches (U-Net call arguments), collecting :class:`Calibration`."""
    import torch.nn.functional as F

    sums: dict[tuple[str, str], torch.Tensor] = {}
    counts: dict[tuple[str, str], int] = {}

    def add(key, value, n):
        sums[key] = sums.get(key, 0) + value
        counts[key] = counts.get(key, 0) + n

    def hook_for(name, patches):
        def hook(module, args):
            x = args[0].float()
            if isinstance(module, nn.Conv2d):
                flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, B*H*W)
                if patches:
                    b, c = x.shape[:2]
                    p = F.unfold(x, module.kernel_size, padding=module.padding).view(b, c, -1, flat.shape[1] // b)
                    add(("patches", name), torch.einsum("bcpl,bcql->cpq", p, p), flat.shape[1])
            else:
                flat = x.reshape(-1, x.shape[-1]).T  # (C, tokens)
            z = torch.cat([flat, flat.new_ones(1, flat.shape[1])]).double()
            add(("inputs", name), z @ z.T, flat.shape[1])
        return hook

    norms: dict[str, dict] = {}

    def norm_hook_for(name):
        def hook(module, args):
            x = args[0].float().flatten(2)  # (B, C, positions)
            norms.setdefault(name, {"groups": module.num_groups, "eps": module.eps, "mean": [], "sq": []})
            norms[name]["mean"].append(x.mean(-1))
            norms[name]["sq"].append(x.pow(2).mean(-1))
        return hook

    hooks = []
    for name, module in unet.named_modules():
        if isinstance(module, nn.GroupNorm):
            hooks.append(module.register_forward_pre_hook(norm_hook_for(name)))
        elif isinstance(module, nn.Conv2d) and module.groups == 1 and module.in_channels <= max_inputs:
            patches = bool(re.search(r"resnets\.\d+\.conv[12]$", name)) and module.kernel_size == (3, 3)
            hooks.append(module.register_forward_pre_hook(hook_for(name, patches)))
        elif isinstance(module, nn.Linear) and module.in_features <= max_inputs:
            hooks.append(module.register_forward_pre_hook(hook_for(name, False)))
    try:
        for b in batches:
            unet(**b)
    finally:
        for h in hooks:
            h.remove()
    out = Calibration(norms={n: {**v, "mean": torch.cat(v["mean"]), "sq": torch.cat(v["sq"])}
                             for n, v in norms.items()})
    for (kind, name), v in sums.items():
        getattr(out, kind)[name] = (v / counts[kind, name]).float() if kind == "patches" else v / counts[kind, name]
    return out


FOLD_RIDGE = 1.0  # relative to the kept channels' mean energy; see docs/pruning.md for the measurement


def fold_pruned_inputs(weight: torch.Tensor, keep: torch.Tensor, moments: torch.Tensor, ridge: float = FOLD_RIDGE
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel reconstruction (He et al. 2017, "Channel Pruning"; ThiNet): the removed input channels' contribution
    is folded into the kept ones by their least-squares prediction from the kept channels and a constant.

    ``weight``: (out, in, ...) over all teacher input channels; ``keep``: kept input channels; ``moments``:
    (in+1, in+1) second moments of [x, 1] on calibration inputs. Returns the weight on the kept channels
    (out, len(keep), ...) and what the layer's bias gains (out,): with ``ridge=0``, exact when the removed channels
    are affine functions of the kept ones (for a conv, away from the zero-padded border). The ridge shrinks the
    prediction: the pruned student's own inputs drift from the teacher's (its GroupNorms see fewer channels), and a
    full-strength fold amplifies that drift."""
    n = weight.shape[1]
    gone = torch.tensor(sorted(set(range(n)) - set(keep.tolist())), dtype=torch.long)
    if len(gone) == 0:
        return weight.index_select(1, keep), weight.new_zeros(weight.shape[0])
    basis = torch.cat([keep, torch.tensor([n])])  # the kept channels and the constant
    m = moments.double()
    gram = m[basis][:, basis]
    gram = gram + ridge * gram.diagonal()[:-1].mean() * torch.diag(torch.cat([torch.ones(len(keep)),
                                                                              torch.zeros(1)])).double()
    a = torch.linalg.solve(gram, m[basis][:, gone]).T.float()  # (gone, kept + 1): x_gone ~ a @ [x_keep, 1]
    w_gone = weight.index_select(1, gone)
    folded = weight.index_select(1, keep) + torch.einsum("og...,gk->ok...", w_gone, a[:, :-1])
    bias = torch.einsum("og...,g->o", w_gone, a[:, -1])
    return folded, bias


def renormalize(weight: torch.Tensor, bias: torch.Tensor, keep: torch.Tensor, stats: dict
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine parameters, on the kept channels, of a GroupNorm with as many groups over the kept channels only,
    corrected so that it outputs what the teacher's GroupNorm did.

    Per sample and channel, ``(x - m) / s`` over the teacher's group equals ``r (x - m') / s' + (m' - m) / s`` over
    the student's, with r = s' / s: the gain becomes ``weight * r`` and the bias gains ``weight * (m' - m) / s``, with
    r and the shift averaged over calibration samples (exact for one sample). ``keep``: the kept channels in the
    student's order; ``stats``: ``Calibration.norms`` of the teacher's GroupNorm."""
    mean, sq, groups = stats["mean"].double(), stats["sq"].double(), stats["groups"]

    def moments(mean, sq, group):  # per sample and group: mean and standard deviation over the group's channels
        n = torch.zeros(groups, dtype=torch.float64).index_add_(0, group, torch.ones(len(group), dtype=torch.float64))
        m = torch.zeros(len(mean), groups, dtype=torch.float64).index_add_(1, group, mean) / n
        v = torch.zeros(len(mean), groups, dtype=torch.float64).index_add_(1, group, sq) / n - m.pow(2)
        return m, (v.clamp(min=0) + stats["eps"]).sqrt()

    teacher = torch.arange(len(weight)) // (len(weight) // groups)
    student = torch.arange(len(keep)) // (len(keep) // groups)
    m, s = moments(mean, sq, teacher)
    m2, s2 = moments(mean[:, keep], sq[:, keep], student)
    m, s = m[:, teacher[keep]], s[:, teacher[keep]]
    m2, s2 = m2[:, student], s2[:, student]
    ratio, shift = (s2 / s).mean(0).float(), ((m2 - m) / s).mean(0).float()
    return weight[keep] * ratio, bias[keep] + weight[keep] * shift
