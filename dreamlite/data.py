"""Training data: infinite, seeded streams of the shapes world for text-to-image and editing, and the sources recovery
training draws from (the shapes world, or image-caption pairs and edit triplets on disk).

Each stream is a plain iterator (numpy images, captions, scenes) plus a torch ``IterableDataset`` that gives every
DataLoader worker its own disjoint seed, so a (seed, worker) pair always replays the same samples.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dreamlite.evaluation.shapes import render
from dreamlite.io import DreamliteError, inside
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


# ------------------------------------------------------------------------------------------ training sources
class DataSource(Protocol):
    """Where recovery training draws its samples: ``rng`` alone decides which, so a batch is a pure function of
    (seed, step). Images are uint8 (H, W, 3) at ``size`` pixels; ``tasks`` names what it has ("t2i", "edit")."""
    size: int
    tasks: tuple[str, ...]

    def t2i(self, rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], list[str]]: ...

    def edit(self, rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]: ...


class ShapesData:
    """The shapes world, rendered on the fly (every sample is new)."""
    tasks = ("t2i", "edit")

    def __init__(self, size: int = 64):
        self.size = size

    def t2i(self, rng, n):
        pairs = [sample_t2i(rng) for _ in range(n)]
        return [render(scene, self.size) for scene, _ in pairs], [caption for _, caption in pairs]

    def edit(self, rng, n):
        recs = [sample_edit_train(rng) for _ in range(n)]
        return ([render(r.source, self.size) for r in recs], [render(r.target, self.size) for r in recs],
                [r.prompt for r in recs])


class FolderData:
    """Real data on disk: ``ROOT/t2i.jsonl`` lines ``{"image": REL, "caption": str}`` (image-caption pairs) and
    ``ROOT/edit.jsonl`` lines ``{"source": REL, "target": REL, "instruction": str}`` (edit triplets); paths are
    relative to ROOT and may not leave it. Samples are drawn with replacement; images are resized to ``size``."""

    def __init__(self, root, size: int):
        self.root, self.size = Path(root), size
        if not self.root.is_dir():
            raise DreamliteError(f"data: {root} is not a folder")
        self.records = {name: self._read(name) for name in ("t2i", "edit")}
        self.tasks = tuple(name for name, rows in self.records.items() if rows)

    def _read(self, name: str) -> list[dict]:
        path = self.root / f"{name}.jsonl"
        if not path.is_file():
            return []
        keys = ("image", "caption") if name == "t2i" else ("source", "target", "instruction")
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            where = f"{path}:{i + 1}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DreamliteError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in keys):
                raise DreamliteError(f"{where}: expected string fields {', '.join(keys)}")
            for k in keys[:-1]:
                inside(self.root, row[k], where)
            rows.append(row)
        return rows

    def _records(self, name: str, rng, n: int) -> list[dict]:
        rows = self.records[name]
        if n and not rows:
            raise DreamliteError(f"data: {self.root / (name + '.jsonl')} is missing or empty")
        return [rows[int(i)] for i in rng.integers(len(rows), size=n)] if n else []

    def _image(self, rel: str) -> np.ndarray:
        from PIL import Image

        path = inside(self.root, rel, str(self.root))
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB").resize((self.size, self.size), Image.BICUBIC))
        except OSError as e:
            raise DreamliteError(f"{path}: cannot read the image ({e})") from None

    def t2i(self, rng, n):
        rows = self._records("t2i", rng, n)
        return [self._image(r["image"]) for r in rows], [r["caption"] for r in rows]

    def edit(self, rng, n):
        rows = self._records("edit", rng, n)
        return ([self._image(r["source"]) for r in rows], [self._image(r["target"]) for r in rows],
                [r["instruction"] for r in rows])


def data_source(spec: str, size: int) -> DataSource:
    """``shapes`` (the shapes world) or a folder in the ``FolderData`` layout."""
    return ShapesData(size) if spec == "shapes" else FolderData(spec, size)


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> float (B, 3, H, W) in [-1, 1]; an empty list gives a (0, 3, 0, 0) tensor."""
    if not images:
        return torch.zeros(0, 3, 0, 0)
    return torch.stack([to_tensor(im) for im in images])
