"""Feature distillation at matching block outputs (BK-SDM, Kim et al. 2023; SnapGen, Hu et al. 2024): the student's
down, mid and up block outputs are projected to the teacher's widths by learned 1x1 convolutions and pulled toward
the teacher's. An in-context student's maps are (target | cond) along the width: only the target half is compared.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dreamlite.io import DreamliteError


def block_widths(config) -> dict[str, int]:
    """Output channels of every down / mid / up block of a diffusers U-Net config, by module name."""
    chans = list(config["block_out_channels"])
    out = {f"down_blocks.{i}": c for i, c in enumerate(chans)}
    out["mid_block"] = chans[-1]
    out |= {f"up_blocks.{i}": c for i, c in enumerate(reversed(chans))}
    return out


def matching_blocks(student_config, teacher_config) -> dict[str, tuple[int, int]]:
    """Blocks both U-Nets have at the same position: name -> (student width, teacher width)."""
    s, t = block_widths(student_config), block_widths(teacher_config)
    if len(student_config["block_out_channels"]) != len(teacher_config["block_out_channels"]):
        raise DreamliteError(f"feature distillation: the student has {len(student_config['block_out_channels'])} "
                             f"resolution stages and the teacher {len(teacher_config['block_out_channels'])}; "
                             "set the feature weight to 0")
    return {k: (s[k], t[k]) for k in s}


class Taps:
    """Forward hooks that keep the output of named submodules for one forward pass."""

    def __init__(self, module: nn.Module, names):
        self.out: dict[str, torch.Tensor] = {}
        modules = dict(module.named_modules())
        self.handles = [modules[n].register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name):
        def hook(_module, _args, output):
            self.out[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def pop(self, target_half: bool = False) -> dict[str, torch.Tensor]:
        """The kept outputs, emptied; ``target_half``: of an in-context model, only the left (target) half."""
        out, self.out = self.out, {}
        return {k: v[..., : v.shape[-1] // 2] for k, v in out.items()} if target_half else out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class FeatureProjector(nn.Module):
    """One 1x1 convolution per matched block, student width -> teacher width (trained with the student, then
    dropped)."""

    def __init__(self, widths: dict[str, tuple[int, int]]):
        super().__init__()
        self.names = list(widths)
        self.proj = nn.ModuleList(nn.Conv2d(s, t, 1) for s, t in widths.values())

    def forward(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) per-sample loss: the mean over blocks of ``|P s - t|^2 / |t|^2`` (each block's error relative to
        the teacher feature's energy, so every resolution counts alike)."""
        losses = []
        for name, proj in zip(self.names, self.proj):
            s, t = student[name], teacher[name].float()
            if s.shape[-2:] != t.shape[-2:]:
                raise DreamliteError(f"feature distillation: {name} is {tuple(s.shape[-2:])} in the student and "
                                     f"{tuple(t.shape[-2:])} in the teacher")
            err = (proj(s.float()) - t).pow(2).mean(dim=(1, 2, 3))
            losses.append(err / t.pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-6))
        return torch.stack(losses).mean(0)
