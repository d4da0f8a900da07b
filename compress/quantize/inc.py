"""Torch-side INT8 through Intel Neural Compressor (3.x, PT2E static quantization): the comparison to the QDQ ONNX
artifacts. Calibrated on the same sampler-recorded denoiser feeds as the ONNX path (``calibration_feeds``), and
exposed as a session with ONNX Runtime's ``get_inputs`` / ``run`` so the project's sampler and benchmarks run it
unchanged through ``OrtDenoiser``.

Optional dependency: ``pip install neural-compressor-pt -c constraints.txt``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dreamlite.io import DreamliteError


@dataclass
class _Input:
    name: str
    shape: list[int]


class TorchSession:
    """A torch module called with positional inputs, behind ONNX Runtime's session interface."""

    def __init__(self, module, inputs: list[_Input]):
        self.module, self.inputs = module, inputs

    def get_inputs(self) -> list[_Input]:
        return self.inputs

    @torch.no_grad()
    def run(self, _outputs, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [torch.from_numpy(feed[i.name]) for i in self.inputs]
        return [self.module(*args).float().numpy()]


def inc_int8_session(fp32_artifact, feeds: list[dict[str, np.ndarray]]) -> TorchSession:
    """INT8 static quantization (INC's default ``StaticQuantConfig``: int8 weights per channel, int8 activations) of
    the U-Net of an fp32 artifact folder (its ``config.json`` and the model it was exported from), calibrated on
    ``feeds`` (the artifact's input names)."""
    try:
        from neural_compressor.torch.export import export
        from neural_compressor.torch.quantization import StaticQuantConfig, convert, prepare
    except ImportError:
        raise DreamliteError("neural-compressor is not installed "
                             "(pip install -e '.[inc]' -c constraints.txt)") from None
    from dreamlite.models.bundle import load_bundle

    from .artifact import verify
    from .export import UNetGraph
    from .qdq import _quiet

    if not feeds:
        raise DreamliteError("--calib: no calibration feeds for neural-compressor")
    manifest = verify(fp32_artifact)
    torch_model = load_bundle(manifest["model"])
    graph = UNetGraph(torch_model.unet.float().eval(), *manifest["image_size"]).eval()
    inputs = [_Input(i["name"], list(i["shape"])) for i in manifest["inputs"]]
    args = tuple(torch.from_numpy(feeds[0][i.name]) for i in inputs)
    with _quiet("neural_compressor"):
        prepared = prepare(export(graph, args), StaticQuantConfig())
        with torch.no_grad():
            for feed in feeds:
                prepared(*[torch.from_numpy(feed[i.name]) for i in inputs])
        return TorchSession(convert(prepared), inputs)

