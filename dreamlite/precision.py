"""Whether bf16 autocast pays on a device.

oneDNN runs bf16 convolutions and matmuls natively only on CPUs with AVX-512 (or AMX); elsewhere autocast emulates
them. On a 2-core AMD EPYC with AVX2 only, shapes-server trained at 2.6 samples/s in bf16 against 42.2 in fp32 and
sampled 25 times slower (`python benchmarks/model_speed.py`). Asking for bf16 there is honoured, with a warning.
"""
from __future__ import annotations

import warnings

import torch

from .io import DreamliteWarning


def bf16_is_native(device_type: str) -> bool:
    """True unless ``device_type`` is a CPU whose oneDNN has no native bf16 kernels (torch's own check)."""
    if device_type != "cpu":
        return True
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is not None:
        return bool(check())
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def warn_if_bf16_slow(precision: str | None, device_type: str, where: str) -> None:
    """Warn (``DreamliteWarning``, naming ``where``) when bf16 is asked for on a device that can only emulate it."""
    if precision == "bf16" and not bf16_is_native(device_type):
        warnings.warn(f"{where}: bf16 on this CPU is emulated (no AVX-512 / AMX) and runs 16 to 25 times slower than "
                      "fp32; use fp32 here", DreamliteWarning, stacklevel=3)
