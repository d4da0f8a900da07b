"""Stage kinds that compress a model: ``prune``."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dreamlite.compress.prune.importance import CRITERIA
from dreamlite.compress.prune.passes import PassSettings, chain_problem
from dreamlite.recipe import StageConfig, StageContext, stage

from .models import ModelInput, stage_model


Criterion = Literal[CRITERIA]  # the importance registry's names


class PruneStage(StageConfig):
    kind: Literal["prune"]
    input: str | None = Field(None, description="earlier stage whose model/ folder is the teacher")
    teacher: str | None = Field(None, description="or: a preset, zoo:NAME or a model folder")
    target: str | None = Field(None, description="a DreamLite preset or DreamLiteUNetModel config file")
    params: str | None = Field(None, description="or a parameter budget, e.g. 0.39B")
    macs: str | None = Field(None, description="or a MACs-per-call budget, e.g. 1.4T")
    importance: Criterion | None = Field(
        None, description="the width and heads criterion (default: taylor with calibration, else magnitude)")
    calib: int | None = Field(None, ge=0, description="calibration batches (default: 4 when the teacher can be "
                                                      "driven, else 0)")
    passes: list[PassSettings] | None = Field(None, description="the passes in chain order (depth, width, heads, "
                                                             "materialize), each at most once; a pass left out runs "
                                                             "with its defaults")

    @model_validator(mode="after")
    def _one_each(self):
        if (self.input is None) == (self.teacher is None):
            raise ValueError("give exactly one of input (an earlier stage) and teacher")
        if sum(x is not None for x in (self.target, self.params, self.macs)) != 1:
            raise ValueError("give exactly one of target, params and macs")
        if problem := chain_problem(self.passes, self.importance):
            raise ValueError(problem)
        return self

    def inputs(self) -> list[str]:
        return [self.input] if self.input else []


@stage(PruneStage)
def run_prune(cfg: PruneStage, ctx: StageContext) -> dict:
    from dreamlite.compress.prune.target import prune_to_target

    teacher = stage_model(ctx, cfg.input) if cfg.input else cfg.teacher
    report = prune_to_target(teacher, cfg.target, ctx.dir / "model", cfg.importance, cfg.calib, ctx.seed,
                             say=ctx.log, params=cfg.params, macs=cfg.macs, passes=cfg.passes)
    keys = ("teacher_parameters", "parameters", "teacher_macs_per_call", "macs_per_call", "relative_output_deviation",
            "relative_output_deviation_held_out", "relative_output_deviation_random_init")
    return {k: report[k] for k in keys if k in report}


class ExportStage(ModelInput):
    kind: Literal["export"]
    size: int | None = Field(None, ge=8, description="image size in pixels (default: the model's)")
    mode: Literal["generate", "edit"] = "generate"
    batch: int | None = Field(None, ge=1, description="static batch (default: the guidance branches of mode; 1 "
                                                       "when the model's guidance is distilled)")


@stage(ExportStage)
def run_export(cfg: ExportStage, ctx: StageContext) -> dict:
    from dreamlite.compress.quantize.artifact import export_artifact
    from dreamlite.models.bundle import load_bundle

    m = export_artifact(load_bundle(cfg.source(ctx)), ctx.dir / "artifact", cfg.size, cfg.mode, cfg.batch)
    return {"scheme": m["scheme"], "bytes": m["bytes"], "parameters": m["parameters"], **m["check"]}


class QuantizeStage(ModelInput):
    kind: Literal["quantize"]
    scheme: Literal["w8a16", "w8a8"] = "w8a16"
    calib: int = Field(8, ge=1, description="generations (and edits, for in-context models) run for calibration")
    steps: int | None = Field(None, ge=1)
    keep_float: list[str] = Field(default_factory=list, description="modules kept in float (e.g. conv_out)")
    mode: Literal["generate", "edit"] = "generate"
    batch: int | None = Field(None, ge=1, description="static batch (default: the guidance branches of mode; 1 "
                                                       "when the model's guidance is distilled)")
    calib_data: Literal["sampler", "random"] = "sampler"
    backend: Literal["ort", "inc"] = "ort"
    sensitivity: bool = Field(False, description="record each module's share of the error in the manifest")
    fallback: int = Field(0, ge=0, description="modules kept at higher precision, the most sensitive first")


@stage(QuantizeStage)
def run_quantize(cfg: QuantizeStage, ctx: StageContext) -> dict:
    from dreamlite.compress.quantize.qdq import quantize_artifact

    m = quantize_artifact(cfg.source(ctx), ctx.dir / "artifact", cfg.scheme, cfg.calib, cfg.steps,
                          tuple(cfg.keep_float), ctx.seed, mode=cfg.mode, batch=cfg.batch, calib_data=cfg.calib_data,
                          backend=cfg.backend, sensitivity=cfg.sensitivity, fallback=cfg.fallback, say=ctx.log)
    return {"scheme": m["scheme"], "bytes": m["bytes"], **m["check"],
            **({"fallback": m["sensitivity"]["fallback"]} if "sensitivity" in m else {})}
