"""Training data: infinite, seeded streams of the shapes world for text-to-image and editing.

Each stream is a plain iterator (numpy images, captions, scenes) plus a torch ``IterableDataset`` that gives every
DataLoader worker its own disjoint seed, so a (seed, worker) pair always replays the same samples.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dreamlite.evaluation.shapes import render
from dreamlite.evaluation.shapes.world import sample_edit_train, sample_t2i


def t2i_stream(seed: int, size: int = 64, stream: int = 0) -> Iterator[tuple[np.ndarray, str, object]]:
    """Yield (image uint8 (H, W, 3), caption, scene) forever."""
    rng = np.random.default_rng([seed, stream, 10])
    while True:
        scene, caption = sample_t2i(rng)
        yield render(scene, size), caption, scene


def edit_stream(seed: int, size: int = 64, stream: int = 0) -> Iterator[tuple[np.ndarray, str, np.ndarray, object]]:
    """Yield (source uint8, instruction, target uint8, record) forever, over all nine edit types."""
    rng = np.random.default_rng([seed, stream, 11])
    while True:
        rec = sample_edit_train(rng)
        yield render(rec.source, size), rec.prompt, render(rec.target, size), rec


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(127.5).sub(1.0)


class _Stream(IterableDataset):
    def __init__(self, seed: int = 0, size: int = 64):
        self.seed, self.size = seed, size

    def _stream_id(self) -> int:
        info = get_worker_info()
        return 0 if info is None else info.id


class ShapesT2I(_Stream):
    """{"image": (3, H, W) in [-1, 1], "caption": str}"""

    def __iter__(self):
        for image, caption, _ in t2i_stream(self.seed, self.size, self._stream_id()):
            yield {"image": to_tensor(image), "caption": caption}


class ShapesEdit(_Stream):
    """{"source": (3, H, W), "target": (3, H, W), both in [-1, 1], "instruction": str, "edit_type": str}"""

    def __iter__(self):
        for source, prompt, target, rec in edit_stream(self.seed, self.size, self._stream_id()):
            yield {"source": to_tensor(source), "target": to_tensor(target), "instruction": prompt,
                   "edit_type": rec.edit_type}
