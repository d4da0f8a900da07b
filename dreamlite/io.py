"""One way to write and read files: atomic writes (temp file + rename), JSON / JSONL with line-numbered errors,
PNG images, and user-facing errors that name the file at fault."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError


class DreamliteError(Exception):
    """A user mistake or bad input: the CLI prints the message on one line and exits non-zero."""


class DreamliteWarning(UserWarning):
    """A choice that works but costs the user something (speed, quality): the CLI prints it as one line."""


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_jsonl(path, rows) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_json(path) -> object:
    path = Path(path)
    if not path.is_file():
        raise DreamliteError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DreamliteError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def read_jsonl(path) -> Iterator[tuple[int, object]]:
    """Yield (line number, record) for each non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise DreamliteError(f"{path}: file not found")
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DreamliteError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def save_png(path, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format="PNG")


def load_image(path, size: int | None = None) -> np.ndarray:
    """An RGB uint8 array (resized to ``size`` x ``size`` when given); a missing or unreadable file is a
    DreamliteError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DreamliteError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            return np.asarray(im.resize((size, size), Image.Resampling.LANCZOS) if size else im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DreamliteError(f"{path}: not a readable image ({e})") from None


@contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Build a folder as ``out.partial`` and rename it to ``out`` only when complete, so no half-written folder ever
    looks finished. ``out`` must not exist already (or be empty)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DreamliteError(f"{out}: already exists; choose another --out or remove it")
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    os.replace(work, out)


def identity_track(iterable, total=None, description=""):
    """Default progress hook: no display. The CLI passes one that draws a progress bar."""
    return iterable


def inside(root, rel: object, where: str) -> Path:
    """``root / rel`` for a relative path from a manifest, refusing anything that would leave ``root``."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        raise DreamliteError(f"{where}: expected a relative path, got {rel!r}")
    root = Path(root).resolve()
    path = (root / rel).resolve()
    if path != root and root not in path.parents:
        raise DreamliteError(f"{where}: path {rel!r} leaves {root}")
    return path
