"""A labelled contact sheet of the shapes world: scenes with their captions, and edit triplets."""
from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .shapes import GEN_TAGS, render, sample_edit, sample_gen_prompt, scene_for
from .shapes.world import EDIT_TYPES

_FONT = ImageFont.load_default()


def _cell(image: np.ndarray, caption: str, scale: int, width_chars: int) -> Image.Image:
    tile = Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    lines = textwrap.wrap(caption, width_chars)[:3]
    cell = Image.new("RGB", (tile.width, tile.height + 12 * 3 + 4), "white")
    cell.paste(tile, (0, 0))
    draw = ImageDraw.Draw(cell)
    for i, line in enumerate(lines):
        draw.text((2, tile.height + 2 + 12 * i), line, fill="black", font=_FONT)
    return cell


def _grid(rows: list[list[Image.Image]], gap: int = 6) -> Image.Image:
    w = max(sum(c.width for c in r) + gap * (len(r) - 1) for r in rows)
    h = sum(max(c.height for c in r) for r in rows) + gap * (len(rows) - 1)
    sheet = Image.new("RGB", (w, h), (230, 230, 230))
    y = 0
    for r in rows:
        x = 0
        for c in r:
            sheet.paste(c, (x, y))
            x += c.width + gap
        y += max(c.height for c in r) + gap
    return sheet


def preview(seed: int = 0, size: int = 64, per_tag: int = 3, per_type: int = 1, scale: int = 2) -> Image.Image:
    rng = np.random.default_rng(seed)
    chars = max(12, size * scale // 6)
    rows = []
    for tag in GEN_TAGS:
        cells = []
        for _ in range(per_tag):
            p = sample_gen_prompt(rng, tag)
            cells.append(_cell(render(scene_for(p, rng), size), f"[{tag}] {p.prompt}", scale, chars))
        rows.append(cells)
    pairs = []
    for edit_type in EDIT_TYPES:
        for _ in range(per_type):
            rec = sample_edit(rng, edit_type)
            pairs += [_cell(render(rec.source, size), f"source ({edit_type})", scale, chars),
                      _cell(render(rec.target, size), f"-> {rec.prompt}", scale, chars)]
    rows += [pairs[i:i + 2 * per_tag] for i in range(0, len(pairs), 2 * per_tag)]  # per_tag edit pairs a row
    return _grid(rows)


def gen_sheet(folder, results: list[dict], prompts: dict[str, str], per_tag: int = 4, scale: int = 2) -> Image.Image:
    """The first sample of the first ``per_tag`` prompts of each tag in a judged GenEval folder, captioned with the
    prompt and the judge's verdict."""
    from dreamlite.io import load_image

    chars = 64 * scale // 6
    by_tag: dict[str, list[dict]] = {}
    for r in results:
        if r["filename"] == "0000.png" and len(by_tag.setdefault(r["tag"], [])) < per_tag:
            by_tag[r["tag"]].append(r)
    rows = [[_cell(load_image(f"{folder}/{r['folder']}/samples/0000.png"),
                   f"{'ok' if r['correct'] else 'NO'}: {prompts[r['folder']]}", scale, chars) for r in by_tag[t]]
            for t in GEN_TAGS if t in by_tag]
    return _grid(rows)


def edit_sheet(folder, results: list[dict], records: dict, per_row: int = 3, scale: int = 2) -> Image.Image:
    """Source -> edited pairs, one per edit type, captioned with the instruction and the judge's score."""
    from dreamlite.io import load_image

    chars = 64 * scale // 6
    cells, seen = [], set()
    for r in results:
        if r["edit_type"] in seen:
            continue
        seen.add(r["edit_type"])
        rec = records[r["id"]]
        cells += [_cell(load_image(f"{folder}/{rec['source']}"), f"source ({r['edit_type']})", scale, chars),
                  _cell(load_image(f"{folder}/edited/{r['id']}.png"), f"{r['overall']:.1f}: {rec['prompt']}", scale,
                        chars)]
    return _grid([cells[i:i + 2 * per_row] for i in range(0, len(cells), 2 * per_row)])
