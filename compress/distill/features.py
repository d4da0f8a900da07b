"""Feature distillation at matching block outputs (BK-SDM, Kim et al. 2023; SnapGen, Hu et al. 2024): the student's
down, mid and up block outputs are projected to the teacher's widths by learned 1x1 convolutions and pulled toward
the teacher's. An in-context student's maps are (target | cond) along the width: only the target half is compared.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from dreamlite.io import DreamliteError, atomic_path

# A recover stage writes its trained projections here, beside its model/ folder, so that a later recover stage
# that continues from that model does not start them at random (docs/recovery.md).
PROJECTIONS = "feature_projections.safetensors"


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
    """One 1x1 convolution per matched block, student width -> teacher width (trained with the student; saved
    beside it, apart from the model, for a later continuation)."""

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

    def save(self, path, teacher: str) -> None:
        """Write the projections (safetensors, atomically), recording the teacher they map onto."""
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"teacher": teacher, "blocks": json.dumps(self.names)})

    def load(self, path, teacher: str) -> str | None:
        """Start from projections ``save`` wrote for the same blocks, widths and teacher. Returns None when loaded,
        else why not (the projections are then left as they were)."""
        path = Path(path)
        if not path.is_file():
            return f"no {path.name} beside the student"
        try:
            with safe_open(str(path), "pt") as f:  # one read: the metadata and the tensors
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            return f"{path}: not readable ({e})"
        if meta.get("teacher") != teacher:
            return f"{path.name} maps onto teacher {meta.get('teacher')!r}, not {teacher!r}"
        own = self.state_dict()
        if meta.get("blocks") != json.dumps(self.names) or tensors.keys() != own.keys() or any(
                tensors[k].shape != own[k].shape for k in own):
            return f"{path.name} was trained for other block widths"
        self.load_state_dict(tensors)
        return None
