"""Stage kinds that make or measure models: ``train-teacher`` and ``bench``."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from dreamlite.recipe import StageConfig, StageContext, stage
from dreamlite.train import TrainSettings, fit


class TrainTeacherStage(StageConfig):
    kind: Literal["train-teacher"]
    preset: str = Field("shapes-server", description="server preset trained from scratch (epsilon prediction)")
    train: TrainSettings
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="fraction of empty captions, for guidance")
    snr_gamma: float | None = Field(5.0, gt=0, description="Min-SNR-gamma loss weight (null = plain MSE)")
    save_dtype: Literal["fp32", "fp16"] = "fp16"


@stage(TrainTeacherStage)
def run_train_teacher(cfg: TrainTeacherStage, ctx: StageContext) -> dict:
    from dreamlite.models.bundle import from_preset
    from dreamlite.models.teacher import EpsilonTask, t2i_batch

    bundle = from_preset(cfg.preset, seed=ctx.seed)
    if bundle.prediction != "epsilon" or bundle.in_context:
        from dreamlite.io import DreamliteError
        raise DreamliteError(f"preset: {cfg.preset!r} is not an epsilon-prediction server U-Net")
    task = EpsilonTask(bundle.unet, bundle.text, bundle.codec, cfg.snr_gamma)
    latent = (bundle.unet.config.in_channels, bundle.latent_size(), bundle.latent_size())

    def batches(step: int) -> dict:
        return t2i_batch(ctx.seed, step, cfg.train.batch, latent, cfg.caption_dropout, bundle.image_size)

    summary = fit(task, batches, cfg.train, ctx.dir / "train", ctx.track, ctx.log, description="teacher")
    if cfg.save_dtype == "fp16":
        bundle.unet.to(torch.float16)
    bundle.save_pretrained(ctx.dir / "model", stage="train-teacher", trained_steps=cfg.train.steps,
                           samples_seen=cfg.train.steps * cfg.train.batch)
    return {**summary, "parameters": sum(p.numel() for p in bundle.unet.parameters())}
