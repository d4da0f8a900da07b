"""ONNX export of a U-Net with static shapes, as QNN wants: batch, latent size (in-context width included) and
text length are fixed; the addition-embedding time ids are baked in as constants for the exported image size."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from dreamlite.io import DreamliteError, atomic_path
from dreamlite.models.conditioning import time_ids
from dreamlite.evaluation.footprint import text_shapes

OPSET = 21
SCOPES = "pkg.torch.onnx.name_scopes"  # node metadata: the module path from the root, then the op


class UNetGraph(nn.Module):
    """``forward(sample, timestep, encoder_hidden_states[, text_embeds]) -> noise/velocity prediction``."""

    def __init__(self, unet: nn.Module, height: int, width: int):
        super().__init__()
        self.unet = unet
        self.kind = unet.config.addition_embed_type
        _, pooled = text_shapes(dict(unet.config), 0)
        ids = time_ids(dict(unet.config), height, width, 1, pooled)
        self.register_buffer("time_ids", ids if ids is not None else torch.zeros(1, 0), persistent=False)

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None):
        added = None
        if self.kind in ("text_time", "time"):
            added = {"time_ids": self.time_ids.expand(sample.shape[0], -1)}
            if self.kind == "text_time":
                added["text_embeds"] = text_embeds
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


def input_names(unet: nn.Module) -> list[str]:
    names = ["sample", "timestep", "encoder_hidden_states"]
    return names + (["text_embeds"] if unet.config.addition_embed_type == "text_time" else [])


def example_inputs(unet: nn.Module, batch: int, latent_hw: tuple[int, int], text_tokens: int) -> tuple:
    cfg = dict(unet.config)
    width, pooled = text_shapes(cfg, text_tokens)
    x = (torch.randn(batch, cfg["in_channels"], *latent_hw), torch.full((batch,), 500.0),
         torch.randn(batch, text_tokens, width))
    return x + ((torch.randn(batch, pooled),) if cfg.get("addition_embed_type") == "text_time" else ())


def export_onnx(unet: nn.Module, path, batch: int, latent_hw: tuple[int, int], image_hw: tuple[int, int],
                text_tokens: int, external: bool = False) -> Path:
    """Export ``unet`` (fp32) to ``path`` with opset 21 and static shapes; the file appears only when complete.
    ``external``: weights in ``path.data`` beside the graph (needed past protobuf's 2 GB limit)."""
    graph = UNetGraph(unet.float().eval(), *image_hw).eval()
    return export_graph(graph, example_inputs(unet, batch, latent_hw, text_tokens), input_names(unet), path,
                        type(unet).__name__, external)


def export_graph(module: nn.Module, args: tuple, names: list[str], path, what: str, external: bool = False,
                 rewrite: Callable | None = None) -> Path:
    """``module(*args)`` as an opset-21 ONNX graph at ``path`` (inputs ``names``, output ``out``), fully checked;
    ``rewrite(model_proto)`` edits it before saving. The file appears only when complete."""
    import onnx

    path = Path(path)
    try:
        program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, input_names=names,
                                    output_names=["out"], optimize=True)
    except Exception as e:  # the exporter raises many types; say which model failed and why, in one line
        raise DreamliteError(f"ONNX export of {what} failed: {str(e).splitlines()[0]}") from None
    model = program.model_proto
    for node in model.graph.node:  # keep each node's module path; drop stack traces and FX dumps (half the file)
        scopes = [p for p in node.metadata_props if p.key == SCOPES]
        del node.metadata_props[:]
        node.metadata_props.extend(scopes)
    if rewrite is not None:
        rewrite(model)
    if external:
        _save_external(model, path)
        onnx.checker.check_model(str(path), full_check=True)
        return path
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
    return path


def _save_external(model, path: Path) -> None:
    """Graph at ``path``, weights in ``path.data``; both written under temporary names and renamed together."""
    import shutil

    import onnx

    stage = path.with_name(f".{path.name}.staging")
    stage.mkdir(exist_ok=True)
    try:
        onnx.save_model(model, str(stage / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data")
        (stage / f"{path.name}.data").replace(path.with_name(f"{path.name}.data"))
        (stage / path.name).replace(path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
