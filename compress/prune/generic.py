"""Width pruning of a diffusers model folder from the command line: example and calibration inputs are made from
the model's config, the result is written with ``save_pruned`` and a report."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from dreamlite.io import DreamliteError, read_json, write_json

from .width import load_pruned, prune_width, run, save_pruned, tensors


def example_inputs(model: nn.Module, batch: int = 1, generator: torch.Generator | None = None) -> dict:
    """Random inputs of the right shapes for a diffusers U-Net (2D, conditional, DreamLite) or autoencoder."""
    c = dict(model.config)
    name = type(model).__name__

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    size = c.get("sample_size") or 32
    size = size[0] if isinstance(size, (list, tuple)) else size
    if name in ("AutoencoderKL", "AutoencoderTiny"):
        return {"sample": randn(batch, c.get("in_channels", 3), 32, 32)}
    inputs = {"sample": randn(batch, c["in_channels"], min(size, 16), min(size, 16)),
              "timestep": torch.full((batch,), 500.0)}
    if name == "UNet2DModel":
        return inputs
    if name not in ("UNet2DConditionModel", "DreamLiteUNetModel"):
        raise DreamliteError(f"{name}: no example inputs known for this diffusers class (U-Nets and autoencoders)")
    from dreamlite.evaluation.footprint import text_shapes
    from dreamlite.models.conditioning import time_ids

    width, pooled = text_shapes(c, 8)
    inputs["encoder_hidden_states"] = randn(batch, 8, width)
    ids = time_ids(c, 64, 64, batch, pooled)
    if ids is not None:
        inputs["added_cond_kwargs"] = {"time_ids": ids} | ({"text_embeds": randn(batch, pooled)} if pooled else {})
    return inputs


def _load(folder: Path) -> nn.Module:
    import diffusers

    cfg = read_json(folder / "config.json")
    name = cfg.get("_class_name") if isinstance(cfg, dict) else None
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise DreamliteError(f"{folder / 'config.json'}: _class_name {name!r} is not a diffusers model class")
    if not any(folder.glob("*.safetensors")):
        raise DreamliteError(f"{folder}: no .safetensors weights (dreamlite never unpickles)")
    return cls.from_pretrained(folder, use_safetensors=True, torch_dtype=torch.float32).eval()


def prune_folder(teacher, out, keep: float, importance: str = "magnitude", calib: int = 4, seed: int = 0) -> dict:
    """Prune ``teacher`` (a diffusers model folder) to ``keep`` of its width into ``out``; returns the report."""
    teacher, out = Path(teacher), Path(out)
    if not (teacher / "config.json").is_file():
        raise DreamliteError(f"{teacher}: not a diffusers model folder (no config.json)")
    model = _load(teacher)
    gen = torch.Generator().manual_seed(seed)
    inputs = example_inputs(model, 1, gen)
    batches = [example_inputs(model, 2, gen) for _ in range(calib)]
    reference = [tensors(run(model, b))[0].detach() for b in batches]

    def loop(m):  # calibration: the model's own outputs on random inputs (taylor: their squared norm)
        return sum(tensors(run(m, b))[0].float().pow(2).mean() for b in batches)

    before = sum(p.numel() for p in model.parameters())
    history = prune_width(model, 1 - keep, inputs, importance, calibration=loop)
    with torch.no_grad():
        deviation = [float((tensors(run(model, b))[0] - r).pow(2).mean() / r.pow(2).mean().clamp_min(1e-12))
                     for b, r in zip(batches, reference)]
    save_pruned(model, history, out)
    report = {"teacher": str(teacher), "class": type(model).__name__, "keep": keep, "importance": importance,
              "parameters_before": before, "parameters_after": sum(p.numel() for p in model.parameters()),
              "relative_output_deviation": sum(deviation) / len(deviation), "calibration_batches": calib,
              "reload": "dreamlite.compress.prune.load_pruned(folder, inputs)"}
    write_json(out / "dreamlite.json", report)
    return report


def reload(folder, seed: int = 0) -> nn.Module:
    """Reload a folder written by ``prune_folder`` (its example inputs are rebuilt from the recorded config)."""
    from .width import _rebuild, RECORD

    folder = Path(folder)
    base = _rebuild(read_json(folder / RECORD).get("base") or {}, folder / RECORD)
    return load_pruned(folder, example_inputs(base, 1, torch.Generator().manual_seed(seed)), base)
