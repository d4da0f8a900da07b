"""Stage kind ``recover``: task-progressive recovery training of a pruned student (compress/distill/recover.py)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from dreamlite.compress.distill.config import Phase
from dreamlite.recipe import StageContext, stage

from .models import SamplerDefaults, TeacherInput, stage_model


class RecoverStage(TeacherInput):
    """Without a teacher (neither ``teacher`` nor ``teacher_input``) the student trains on the task loss alone."""
    kind: Literal["recover"]
    input: str | None = Field(None, description="earlier stage whose model/ folder is the student (a prune stage)")
    student: str | None = Field(None, description="or: a model folder")
    data: str = Field("shapes", description="'shapes' (the shapes world) or a folder with t2i.jsonl / edit.jsonl")
    phases: list[Phase] = Field(min_length=1, description="sub-stages in order: t2i, edit, joint")
    sigma_sampling: Literal["uniform", "logit-normal"] = "logit-normal"
    shift: float = Field(1.0, gt=0, description="sigma shift s' = shift s / (1 + (shift - 1) s)")
    edit_shift: float | None = Field(None, gt=0, description="editing samples' sigma shift (default: shift); the "
                                     "source only helps where the noisy target hides the layout, at high noise")
    held_out: int = Field(32, ge=0, description="held-out scenes (and edits) whose flow losses the stage reports "
                                              "before and after training, and the teacher's (0: none)")
    save_dtype: Literal["fp32", "fp16"] = "fp32"
    sampler: SamplerDefaults | None = Field(None, description="sampling defaults recorded in the model's dreamlite.json")

    @model_validator(mode="after")
    def _one_student(self):
        if (self.input is None) == (self.student is None):
            raise ValueError("give exactly one of input (an earlier stage) and student")
        return self

    def inputs(self) -> list[str]:
        return [*([self.input] if self.input else []), *super().inputs()]


@stage(RecoverStage, distributed=True)
def run_recover(cfg: RecoverStage, ctx: StageContext) -> dict:
    from dreamlite.compress.distill.heldout import held_out_losses, teacher_held_out_losses, teacher_worse_from
    from dreamlite.compress.distill.features import PROJECTIONS
    from dreamlite.compress.distill.recover import recover, saved_projector
    from dreamlite.data import data_source
    from dreamlite.models.bundle import load_bundle
    from dreamlite.train import check_launch

    check_launch()  # before loading anything: a DeepSpeed launch would fail only after the held-out losses
    student = load_bundle(stage_model(ctx, cfg.input) if cfg.input else cfg.student)
    spec = cfg.teacher_source(ctx)
    teacher = load_bundle(spec) if spec else None
    data = data_source(cfg.data, student.image_size)
    tasks = {t for p in cfg.phases for t in (("t2i", "edit") if p.task == "joint" else (p.task,))}  # what data has
    measure = ctx.main and cfg.held_out > 0
    before = held_out_losses(student, data, cfg.held_out, tasks=tasks) if measure else None
    torch.manual_seed(ctx.seed)  # the feature projections' initialisation
    projector = saved_projector(student, teacher, cfg.phases, ctx.log if ctx.main else (lambda m: None))
    phases = recover(student, teacher, cfg.phases, ctx.dir / "train", data, ctx.seed, cfg.sigma_sampling, cfg.shift,
                     cfg.edit_shift, track=ctx.track, log=ctx.log, projector=projector)
    held_out = {}
    if measure:
        after = held_out_losses(student, data, cfg.held_out, tasks=tasks)
        names = {"t2i": "held_out_t2i_loss", "edit": "held_out_edit_loss", "source_gain": "source_gain"}
        held_out = {name: after[k]["mean"] for k, name in names.items() if k in after}
        if "copy_source" in after:  # does it beat copying its source? (the default grid starts at sigma 1)
            held_out |= {"edit_loss_at_sigma_1": after["edit"]["per_sigma"]["1.0"],
                         "copy_source_loss": after["copy_source"]["mean"]}
        held_out["held_out"] = {"before": before, "after": after}
        if teacher is not None and "t2i" in after:  # where is the teacher's velocity a better target than the data?
            theirs = teacher_held_out_losses(teacher, data, cfg.held_out, student=student)
            held_out["held_out"]["teacher"] = theirs
            held_out["teacher_worse_from_sigma"] = teacher_worse_from(theirs["t2i"], after["t2i"])
    if ctx.main:
        student.prediction = "flow"
        student.meta.pop("schedule", None)
        if cfg.save_dtype == "fp16":
            student.unet.to(torch.float16)
        extra = {"sampler": cfg.sampler.model_dump()} if cfg.sampler else {}
        student.save_pretrained(ctx.dir / "model", stage="recover", parent=student.name,
                                teacher=teacher.name if teacher else None,
                                phases=[p.model_dump(mode="json") for p in cfg.phases], **extra)
        if projector is not None:  # beside model/, not in it: a training aid, not part of the model's footprint
            projector.save(ctx.dir / PROJECTIONS, teacher.name)
    return {"steps": sum(p.train.steps for p in cfg.phases), "final_loss": phases[-1]["final_loss"],
            "phases": {f"{i + 1}-{p['phase']}": p for i, p in enumerate(phases)}, **held_out}
