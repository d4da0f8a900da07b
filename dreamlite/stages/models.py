"""Stage kinds that make or measure models: ``train-teacher`` and ``bench``."""
from __future__ import annotations

import warnings
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dreamlite.evaluation.shapes.world import GEN_TAGS
from dreamlite.io import DreamliteError, DreamliteWarning, write_json
from dreamlite.models.sampler import Scheduler
from dreamlite.models.teacher import Schedule
from dreamlite.recipe import StageConfig, StageContext, stage
from dreamlite.train import TrainSettings, fit


GenTag = Literal[GEN_TAGS]  # a tuple subscript is the same as listing the tags


def stage_model(ctx: StageContext, name: str) -> str:
    """What an earlier stage made: its deployable artifact/ when it has one, else its model/ folder."""
    folder = ctx.input(name)
    return str(folder / ("artifact" if (folder / "artifact").is_dir() else "model"))


class SamplerDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(50, ge=1)
    cfg: float = Field(5.0, ge=0)
    image_cfg: float = Field(1.5, ge=0, description="image guidance of editing (in-context models)")
    scheduler: Scheduler = "ddim"
    flow_shift: float = Field(1.0, gt=0, description="flow models: shift of the sampling sigmas (1: unshifted)")


class TrainTeacherStage(StageConfig):
    kind: Literal["train-teacher"]
    preset: str = Field("shapes-server", description="server preset trained from scratch (epsilon prediction)")
    train: TrainSettings
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="fraction of empty captions, for guidance")
    tag_weights: dict[GenTag, Annotated[float, Field(ge=0)]] | None = Field(
        None, description="how often each GenEval tag's kind of scene is drawn, relative to the others; a tag not "
                          "listed weighs 1 (default: all equally often)")
    color_captions: float = Field(0.0, ge=0, le=1, description="probability that a two_object or position caption "
                                                               "also names each object's colour")
    snr_gamma: float | None = Field(5.0, gt=0, description="Min-SNR-gamma loss weight (null = plain MSE)")
    snr_floor: float | None = Field(None, gt=0, description="lift the high-noise end's weight: the loss weighs x0 "
                                                            "errors by clamp(SNR, snr_floor, snr_gamma)")
    noise_offset: float = Field(0.0, ge=0, le=1, description="offset-noise strength (a per-image colour shift)")
    binding_loss: float = Field(0.0, ge=0, description="weight of the text encoder's binding objective: each shape "
                                                        "word's state must tell its colour, count and side")
    prediction: Literal["epsilon", "v"] = Field("epsilon", description="what the U-Net predicts: SDXL's epsilon, or "
                                                 "v (a continuation from an epsilon model re-learns its output)")
    schedule: Schedule | None = Field(
        None, description="discrete noise schedule (default: the preset's; recorded in the model's dreamlite.json)")
    save_dtype: Literal["fp32", "fp16"] = "fp16"
    sampler: SamplerDefaults | None = Field(None, description="sampling defaults recorded in the model's dreamlite.json")
    init: str | None = Field(None, description="continue from this model (zoo:NAME or a folder of the same preset): "
                                               "its U-Net and text encoder weights; the optimizer starts fresh")
    input: str | None = Field(None, description="or continue from the model an earlier train-teacher stage made")

    @model_validator(mode="after")
    def _consistent(self):
        if self.init is not None and self.input is not None:
            raise ValueError("give at most one of init (a model) and input (an earlier stage)")
        if self.snr_floor is not None and self.snr_gamma is not None and self.snr_floor > self.snr_gamma:
            raise ValueError(f"snr_floor {self.snr_floor} is above snr_gamma {self.snr_gamma}")
        if self.tag_weights is not None and not any(self.weights()):
            raise ValueError("tag_weights: every tag weighs 0")
        if self.schedule == "zero-snr" and self.prediction != "v":
            raise ValueError("schedule: zero-snr needs prediction: v (at SNR 0 the noise says nothing about the image)")
        if self.schedule == "zero-snr" and self.snr_gamma is not None and self.snr_floor is None:
            raise ValueError("snr_floor: with schedule zero-snr the Min-SNR weight of t = 999 is 0, so the step "
                             "that starts sampling would not be trained; set snr_floor (1: truncated SNR) or "
                             "snr_gamma: null")
        if self.sampler is not None and self.sampler.flow_shift != 1:
            raise ValueError(f"sampler.flow_shift: applies to flow-matching models; this teacher predicts "
                             f"{self.prediction}")
        return self

    def weights(self) -> tuple[float, ...] | None:
        """``tag_weights`` in ``GEN_TAGS`` order, or None for equal weights."""
        if self.tag_weights is None:
            return None
        return tuple(self.tag_weights.get(t, 1.0) for t in GEN_TAGS)

    def inputs(self) -> list[str]:
        return [self.input] if self.input else []


def _init_from(bundle, spec: str) -> dict:
    """Copy the U-Net and text encoder weights of the model ``spec`` into ``bundle`` (same architecture); returns
    the source's dreamlite.json. Warns when the source was trained for another target or schedule (a deliberate
    switch, as zoo:shapes-server's epsilon -> v, zero-snr continuation, or a recipe written for an older model)."""
    from dreamlite.models.bundle import load_bundle

    src = load_bundle(spec)
    if (src.prediction, src.schedule) != (bundle.prediction, bundle.schedule):
        warnings.warn(f"init: {spec} predicts {src.prediction} on schedule {src.schedule}; this stage trains "
                      f"{bundle.prediction} on {bundle.schedule}, so it starts from weights made for another target",
                      DreamliteWarning, stacklevel=2)
    for name, a, b in (("U-Net", bundle.unet, src.unet), ("text encoder", bundle.text, src.text)):
        mine, theirs = a.state_dict(), b.state_dict() if b is not None else {}
        if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
            raise DreamliteError(f"init: {spec}'s {name} does not match the preset {bundle.meta.get('preset')!r}")
        a.load_state_dict({k: v.to(mine[k].dtype) for k, v in theirs.items()})
    return src.meta


@stage(TrainTeacherStage, distributed=True)
def run_train_teacher(cfg: TrainTeacherStage, ctx: StageContext) -> dict:
    from dreamlite.models.bundle import from_preset
    from dreamlite.models.teacher import EpsilonTask, t2i_batch

    bundle = from_preset(cfg.preset, seed=ctx.seed)
    if bundle.prediction != "epsilon" or bundle.in_context:
        raise DreamliteError(f"preset: {cfg.preset!r} is not an epsilon-prediction server U-Net")
    if cfg.schedule:
        bundle.meta["schedule"] = cfg.schedule
    bundle.prediction = cfg.prediction
    start = cfg.init or (stage_model(ctx, cfg.input) if cfg.input else None)
    before = _init_from(bundle, start) if start else {}
    task = EpsilonTask(bundle.unet, bundle.text, bundle.codec, cfg.snr_gamma, cfg.noise_offset, bundle.schedule,
                       cfg.snr_floor, cfg.binding_loss, cfg.prediction)
    latent = (bundle.unet.config.in_channels, bundle.latent_size(), bundle.latent_size())

    def batches(step: int) -> dict:
        return t2i_batch(ctx.seed, step, cfg.train.batch, latent, cfg.caption_dropout, bundle.image_size,
                         tag_weights=cfg.weights(), color_captions=cfg.color_captions)

    summary = fit(task, batches, cfg.train, ctx.dir / "train", ctx.track, ctx.log, description="teacher")
    if not ctx.main:
        return summary
    if cfg.save_dtype == "fp16":
        bundle.unet.to(torch.float16)
    extra = {"sampler": cfg.sampler.model_dump()} if cfg.sampler else {}
    steps = before.get("trained_steps", 0) + cfg.train.steps
    seen = before.get("samples_seen", 0) + cfg.train.steps * cfg.train.batch
    bundle.save_pretrained(ctx.dir / "model", stage="train-teacher", trained_steps=steps, samples_seen=seen,
                           **({"init": cfg.init or f"stage {cfg.input}"} if start else {}), **extra)
    return {**summary, "parameters": sum(p.numel() for p in bundle.unet.parameters())}


class ModelInput(StageConfig):
    """A stage that reads one model: an earlier stage's (``input``) or one named directly (``model``)."""
    input: str | None = Field(None, description="earlier stage whose model/ folder (or artifact/) is used")
    model: str | None = Field(None, description="or: a preset, zoo:NAME, a model folder or an artifact folder")

    @model_validator(mode="after")
    def _one_model(self):
        if (self.input is None) == (self.model is None):
            raise ValueError("give exactly one of input (an earlier stage) and model")
        return self

    def inputs(self) -> list[str]:
        return [*super().inputs(), *([self.input] if self.input else [])]

    def source(self, ctx: StageContext) -> str:
        return self.model or stage_model(ctx, self.input)


class TeacherInput(StageConfig):
    """A stage that learns from a teacher: an earlier stage's model (``teacher_input``) or one named (``teacher``);
    the stage says what it does with neither."""
    teacher_input: str | None = Field(None, description="earlier stage whose model/ folder is the teacher")
    teacher: str | None = Field(None, description="or: zoo:NAME or a model folder")

    @model_validator(mode="after")
    def _one_teacher(self):
        if self.teacher_input is not None and self.teacher is not None:
            raise ValueError("give at most one of teacher_input and teacher")
        return self

    def inputs(self) -> list[str]:
        return [*super().inputs(), *([self.teacher_input] if self.teacher_input else [])]

    def teacher_source(self, ctx: StageContext) -> str | None:
        return stage_model(ctx, self.teacher_input) if self.teacher_input else self.teacher


class BenchStage(ModelInput):
    kind: Literal["bench"]
    bench: Literal["gen", "edit"]
    n: int = Field(20, ge=1, description="prompts per GenEval tag, or edits per ImgEdit type")
    images_per_prompt: int = Field(4, ge=1)
    steps: int | None = Field(None, ge=1, description="sampling steps (default: the model's)")
    cfg: float | None = Field(None, ge=0)
    image_cfg: float | None = Field(None, ge=0)
    flow_shift: float | None = Field(None, gt=0)
    scheduler: Scheduler | None = Field(None, description="epsilon and v models (default: the model's)")
    precision: Literal["fp32", "bf16"] | None = None
    batch: int = Field(16, ge=1)


@stage(BenchStage)
def run_bench(cfg: BenchStage, ctx: StageContext) -> dict:
    from dreamlite.evaluation.model_bench import bench_edit, bench_gen
    from dreamlite.models.bundle import load_bundle
    from dreamlite.models.sampler import default_settings

    bundle = load_bundle(cfg.source(ctx), sampling=True)
    s = default_settings(bundle).override(seed=ctx.seed, scheduler=cfg.scheduler, batch=cfg.batch, steps=cfg.steps,
                                          cfg=cfg.cfg, image_cfg=cfg.image_cfg, precision=cfg.precision,
                                          flow_shift=cfg.flow_shift).check()
    if cfg.bench == "gen":
        summary = bench_gen(bundle, ctx.dir / "geneval", cfg.n, cfg.images_per_prompt, s, ctx.seed, ctx.track)
        write_json(ctx.dir / "bench.json", {"bench": "gen", "folder": "geneval"})
    else:
        summary = bench_edit(bundle, ctx.dir / "imgedit", cfg.n, s, ctx.seed, ctx.track)
        write_json(ctx.dir / "bench.json", {"bench": "edit", "edits": "imgedit/edits.jsonl",
                                            "images": "imgedit/edited"})
    return {"bench": cfg.bench, **summary}
