"""Rewards for post-training: the shapes judge's scores of a model's own images, in [0, 1].

A ``RewardSource`` draws what to sample (prompts to generate, edits to make) and scores the images a model made of
them. For the shapes world both come from the world and its judge: generation earns the share of GenEval's clauses
an image meets (``clause_credit``: 1 exactly when GenEval counts it correct), editing its ImgEdit-style overall
mapped from 1..5 to 0..1. Real-scale rewards (HPSv3, EditReward, as DreamLite) plug in through the same interface.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from dreamlite.io import DreamliteError
from .shapes import parse, render
from .shapes.clauses import clause_credit
from .shapes.edits import score_edit
from .shapes.world import EDIT_TYPES, GEN_TAGS, EditRecord, GenPrompt, sample_edit, sample_gen_prompt


class RewardSource(Protocol):
    """What post-training samples and how it is scored; ``rng`` alone decides what is drawn."""
    tasks: tuple[str, ...]

    def prompts(self, rng: np.random.Generator, n: int) -> list: ...

    def edits(self, rng: np.random.Generator, n: int) -> list: ...

    def prompt_text(self, item) -> str: ...

    def held_out(self, n: int, seed: int) -> tuple[list, list]: ...

    def source_image(self, item) -> np.ndarray: ...

    def score_gen(self, images: np.ndarray, items: Sequence) -> np.ndarray: ...

    def score_edit(self, images: np.ndarray, items: Sequence) -> np.ndarray: ...


class ShapesRewards:
    """GenEval-style prompts of ``tags`` and ImgEdit-style edits of ``edit_types`` (default: all), drawn uniformly;
    rewards from the shapes judge. ``size``: the images' size in pixels."""
    tasks = ("t2i", "edit")

    def __init__(self, size: int = 64, tags: Sequence[str] | None = None, edit_types: Sequence[str] | None = None):
        self.size = size
        self.tags = tuple(tags or GEN_TAGS)
        self.edit_types = tuple(edit_types or EDIT_TYPES)
        for name, values, known in (("tags", self.tags, GEN_TAGS), ("edit_types", self.edit_types, EDIT_TYPES)):
            unknown = [v for v in values if v not in known]
            if unknown:
                raise DreamliteError(f"{name}: unknown {', '.join(map(repr, unknown))} (expected some of "
                                     f"{', '.join(known)})")

    def prompts(self, rng: np.random.Generator, n: int) -> list[GenPrompt]:
        return [sample_gen_prompt(rng, self.tags[int(rng.integers(len(self.tags)))]) for _ in range(n)]

    def edits(self, rng: np.random.Generator, n: int) -> list[EditRecord]:
        return [sample_edit(rng, self.edit_types[int(rng.integers(len(self.edit_types)))]) for _ in range(n)]

    def held_out(self, n: int, seed: int) -> tuple[list[GenPrompt], list[EditRecord]]:
        """``n`` prompts of each tag and ``n`` edits of each type, from ``seed`` (keep it off the benchmarks')."""
        rng = np.random.default_rng([seed, 51])
        return ([sample_gen_prompt(rng, t) for t in self.tags for _ in range(n)],
                [sample_edit(rng, t) for t in self.edit_types for _ in range(n)])

    @staticmethod
    def prompt_text(item) -> str:
        return item.prompt

    def source_image(self, item: EditRecord) -> np.ndarray:
        return render(item.source, self.size)

    def score_gen(self, images: np.ndarray, items: Sequence[GenPrompt]) -> np.ndarray:
        """(N,) the share of each prompt's GenEval clauses its image meets (0 for an image that is not a scene)."""
        return np.asarray([clause_credit(parse(image), item.metadata()) for image, item in zip(images, items)],
                          dtype=np.float32)

    def score_edit(self, images: np.ndarray, items: Sequence[EditRecord]) -> np.ndarray:
        """(N,) each edit's ImgEdit-style overall (1..5) mapped to 0..1."""
        return np.asarray([(score_edit(image, r.source, r.target).overall - 1) / 4 for image, r in zip(images, items)],
                          dtype=np.float32)
