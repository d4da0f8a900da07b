"""Budgets instead of architectures: ``--params 0.39B`` or ``--macs 1.4T`` picks the DreamLite layout of a teacher
(stage-1 cross-attention, self-attention only at the lowest resolution, separable convs, one key/value head, qk
RMSNorm, FFN x3, ``time`` embedding) at the largest width and depth that fit the budget.

Width and depth shrink together by one factor ``m``: each stage keeps ``m`` of its channels (rounded to whole heads
and GroupNorm groups; stage 1 never below 4/3 of the latent channels) and ``m`` of its transformer layers (at least one).
The factor is found by bisection on parameter or MAC counts of models built on the meta device (nothing allocated).
"""
from __future__ import annotations

import math
import re

from dreamlite.io import DreamliteError

_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9, "T": 1e12}
# Stage 1 runs at the latent's resolution and must carry the noisy latent through the skips: measured on the shapes
# teacher (docs/models.md), a 48-latent-channel student with stage 1 at 48 channels kept 4x less of the teacher's
# function after pruning than one at 64 (output deviation 0.50 against 0.11). SDXL (4 channels) is far above it.
STAGE1_OVER_LATENT = 4 / 3


def parse_count(text: str, what: str) -> int:
    """'0.39B', '390M', '1.4T', '389968388' -> an integer."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGBT]?)\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise DreamliteError(f"{what}: {text!r} is not a count (examples: 0.39B, 390M, 1.4T, 389968388)")
    return int(round(float(m.group(1)) * _SUFFIX[m.group(2).upper()]))


def dreamlite_layout(teacher: dict, m: float) -> dict:
    """The DreamLite layout of an SDXL-layout teacher config at width and depth factor ``m`` (0 < m <= 1)."""
    widths, n = list(teacher["block_out_channels"]), len(teacher["block_out_channels"])
    groups = teacher.get("norm_num_groups") or 32
    heads = teacher.get("attention_head_dim") or 8
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * n
    depth = teacher.get("transformer_layers_per_block") or 1
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * n
    head_dim = [w // h for w, h in zip(widths, heads)]
    head_dim[0] = head_dim[1] if n > 1 else head_dim[0]  # stage 1 gains attention: use the next stage's head size
    new_widths, new_heads = [], []
    for s, w in enumerate(widths):
        step = math.lcm(groups, head_dim[s])
        floor = math.ceil(STAGE1_OVER_LATENT * teacher["in_channels"] / step) * step if s == 0 else step
        keep = min(w, max(floor, round(m * w / step) * step))
        new_widths.append(keep)
        new_heads.append(max(1, keep // head_dim[s]))
    has_attn = [t != "DownBlock2D" for t in teacher["down_block_types"]]
    new_depth = [max(1, round(m * d)) if a else 1 for d, a in zip(depth, has_attn)]
    time_dim = teacher.get("addition_time_embed_dim") or 256
    cross = teacher["cross_attention_dim"]
    return {
        "sample_size": teacher["sample_size"], "in_channels": teacher["in_channels"],
        "out_channels": teacher["out_channels"], "layers_per_block": teacher["layers_per_block"],
        "down_block_types": ["CrossAttnDownRemoveSelfAttnBlock2D"] * (n - 1) + ["CrossAttnDownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D"] + ["CrossAttnUpRemoveSelfAttnBlock2DV1"] * (n - 2) + ["UpBlock2D"],
        "block_out_channels": new_widths, "transformer_layers_per_block": new_depth, "num_mid_layers": 1,
        "attention_head_dim": new_heads, "num_kv_heads": 1, "qk_norm": "rms_norm", "ff_mult": 3,
        "use_sep_conv": True, "cross_attention_dim": cross, "encoder_hid_dim": cross,
        "encoder_hid_dim_type": "text_proj_rms", "addition_embed_type": "time", "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": 2 * time_dim, "use_linear_projection": True,
        "norm_num_groups": groups,
    }


def fit_budget(teacher: dict, params: int | None = None, macs: int | None = None,
               measure_macs=None) -> tuple[dict, dict]:
    """The largest DreamLite layout of ``teacher`` within ``params`` parameters or ``macs`` MACs per call
    (``measure_macs(config) -> int``). Returns (config, {"factor", "parameters"[, "macs"]})."""
    from dreamlite.models.presets import build

    if (params is None) == (macs is None):
        raise DreamliteError("budget: give exactly one of --params and --macs")

    def count(cfg):
        if params is not None:
            return sum(p.numel() for p in build(cfg, "DreamLiteUNetModel", "meta").parameters())
        return measure_macs(cfg)

    budget = params if params is not None else macs
    lo, hi = 0.0, 1.0
    smallest = count(dreamlite_layout(teacher, 1e-6))
    if smallest > budget:
        raise DreamliteError(f"budget: the smallest DreamLite layout of this teacher needs {smallest:,} "
                             f"{'parameters' if params is not None else 'MACs'}, more than {budget:,}")
    for _ in range(24):
        mid = (lo + hi) / 2
        if count(dreamlite_layout(teacher, mid)) <= budget:
            lo = mid
        else:
            hi = mid
    cfg = dreamlite_layout(teacher, max(lo, 1e-6))
    found = {"factor": round(lo, 4), "parameters": sum(p.numel() for p in build(cfg, "DreamLiteUNetModel",
                                                                                   "meta").parameters())}
    if macs is not None:
        found["macs"] = count(cfg)
    return cfg, found
