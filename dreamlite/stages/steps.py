"""Stage kind ``step-distill``: a recovered flow model trained to sample in K steps with guidance distilled in
(compress/distill/steps.py)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from dreamlite.compress.distill.steps import StepSettings
from dreamlite.recipe import StageContext, stage

from .models import ModelInput, TeacherInput


class StepDistillStage(ModelInput, TeacherInput, StepSettings):
    """The teacher is a flow model; without one, the model being distilled, as it was before training."""
    kind: Literal["step-distill"]
    data: str = Field("shapes", description="'shapes' (the shapes world) or a folder with t2i.jsonl / edit.jsonl")
    held_out: int = Field(4, ge=0, description="prompts per GenEval tag (and edits per ImgEdit type) on which the "
                                             "stage measures how far K-step sampling lands from the teacher's, "
                                             "before and after (0: none)")
    save_dtype: Literal["fp32", "fp16"] = "fp32"


@stage(StepDistillStage, distributed=True)
def run_step_distill(cfg: StepDistillStage, ctx: StageContext) -> dict:
    from dreamlite.compress.distill.steps import gap_set, step_distill, teacher_sampling, trajectory_gap
    from dreamlite.data import data_source
    from dreamlite.models.bundle import load_bundle
    from dreamlite.train import check_launch

    check_launch()
    source = cfg.source(ctx)
    student = load_bundle(source)
    teacher = load_bundle(cfg.teacher_source(ctx) or source)
    settings = StepSettings(**cfg.model_dump(include=set(StepSettings.model_fields)))
    measure = ctx.main and cfg.held_out > 0
    gaps = {}
    if measure:  # the model as it was, in K steps: with the teacher's guidance (2 or 3 calls a step), and without
        guided = teacher_sampling(teacher, settings).override(steps=cfg.steps)
        ref = gap_set(teacher, settings, cfg.held_out, ctx.seed)
        gaps["before_guided"] = trajectory_gap(student, ref, guided)
        gaps["before_one_call"] = trajectory_gap(student, ref, guided.override(cfg=1.0, image_cfg=1.0))
    summary = step_distill(student, teacher, settings, ctx.dir / "train", data_source(cfg.data, student.image_size),
                           ctx.seed, ctx.track, ctx.log)
    if not ctx.main:
        return summary
    if measure:
        gaps["after"] = trajectory_gap(student, ref)
    gaps = {f"{task}_gap_{when}": round(g[task], 5) for when, g in gaps.items() for task in g}
    if cfg.save_dtype == "fp16":
        student.unet.to(torch.float16)
    student.save_pretrained(ctx.dir / "model", stage="step-distill", parent=student.name, teacher=teacher.name,
                            step_distill={"steps": cfg.steps, "teacher_steps": cfg.teacher_steps,
                                          "cfg": summary["teacher_cfg"], "image_cfg": summary["teacher_image_cfg"],
                                          "flow_shift": summary["flow_shift"], "guidance": "distilled"})
    return {**summary, "sampling_steps": cfg.steps, **gaps}
