"""Typed settings of recovery training (validated at the edge; recipes hold these as data)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dreamlite.train import TrainSettings


class LossWeights(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    task: float = Field(1.0, ge=0, description="flow-matching loss (every sample)")
    output: float = Field(1.0, ge=0, description="output distillation (text-to-image samples)")
    feature: float = Field(1.0, ge=0, description="feature distillation (text-to-image samples)")


class Phase(BaseModel):
    """One sub-stage of recovery: which task it trains, for how long, with which losses."""
    model_config = ConfigDict(extra="forbid")
    task: Literal["t2i", "edit", "joint"]
    train: TrainSettings
    edit_fraction: float = Field(0.5, gt=0, lt=1, description="joint: editing share of each batch")
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="text-to-image samples with an empty caption")
    text_dropout: float = Field(0.05, ge=0, lt=1, description="editing samples with an empty instruction")
    image_dropout: float = Field(0.05, ge=0, lt=1, description="editing samples with a zero source latent")
    identity_fraction: float = Field(0.0, ge=0, lt=1, description="editing samples whose target is their source, "
                                     "with an empty instruction: copying what an edit leaves alone")
    weights: LossWeights = LossWeights()

    @model_validator(mode="after")
    def _split(self):
        t2i, edit = self.counts()
        if self.task == "joint" and (t2i % self.train.accumulate or edit % self.train.accumulate):
            raise ValueError(f"joint batch {self.train.batch} splits into {t2i} text-to-image and {edit} editing "
                             f"samples; each must divide by accumulate {self.train.accumulate}")
        return self

    def counts(self) -> tuple[int, int]:
        """(text-to-image, editing) samples per global batch."""
        b = self.train.batch
        edit = {"t2i": 0, "edit": b, "joint": round(b * self.edit_fraction)}[self.task]
        return b - edit, edit
