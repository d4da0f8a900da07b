"""Step distillation: a flow-matching in-context model trained to sample in K Euler steps, one U-Net call per step,
with classifier-free guidance distilled in (DreamLite's 4-step model; the step before quantization).

The student's K steps are the sampler's own grid (``linspace(1, 1/K, K)`` shifted by ``flow_shift``, then 0). Each
training sample takes one segment ``[s_k, s_k+1]`` of that grid: a scene (or an edit's target) noised to ``s_k``, and
the teacher's guided trajectory from there to ``s_k+1`` with the steps of its own finer grid that fall inside the
segment (2 guidance branches to generate, DreamLite's 3 to edit). The student, called once without guidance,
must land where the teacher did: its velocity is regressed onto ``(x_k - x_teacher) / (s_k - s_k+1)``. Starting each
segment from noised data rather than from the teacher's own trajectory is how PeRFlow (piecewise rectified flow,
Yan et al. 2024) and latent consistency distillation (Luo et al. 2023) draw their starts; the first segment
starts from pure noise, as sampling does. The teacher is by default the model being distilled (its weights
before training): the chain's recovered student.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from dreamlite.data import DataSource, images_to_tensor
from dreamlite.io import DreamliteError, identity_track
from dreamlite.models.sampler import SamplerSettings, default_settings, generate, make_scheduler
from dreamlite.models.teacher import step_generator
from dreamlite.train import TrainSettings, fit

from .flow import flow_noise
from .recover import CachedText, check_pair, flow_call, guided_flow


class StepSettings(BaseModel):
    """What step distillation trains towards; a guidance or shift left out is the teacher's sampling default."""
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(4, ge=1, le=50, description="the student's sampling steps (one U-Net call each)")
    teacher_steps: int = Field(8, ge=1, le=1000, description="the teacher's Euler steps over the whole trajectory "
                                                              "(a multiple of steps)")
    cfg: float | None = Field(None, ge=0, description="the teacher's text guidance (default: its sampler's)")
    image_cfg: float | None = Field(None, ge=0, description="the teacher's image guidance when editing")
    flow_shift: float | None = Field(None, gt=0, description="sigma shift of both grids (default: the teacher's)")
    edit_fraction: float = Field(0.5, ge=0, le=1, description="editing share of each batch (0: generation only)")
    train: TrainSettings

    def counts(self) -> tuple[int, int]:
        """(text-to-image, editing) samples per global batch."""
        edit = round(self.train.batch * self.edit_fraction)
        return self.train.batch - edit, edit


def flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The flow sampler's sigma grid of ``steps`` steps, ending at 0: (steps + 1,)."""
    return make_scheduler("flow", steps, flow_shift=shift).sigmas.float()


def segment_grids(steps: int, teacher_steps: int, shift: float) -> torch.Tensor:
    """(steps, teacher_steps / steps + 1): row k is the teacher's grid from the student's sigma k to its sigma k + 1,
    both ends included. The grids nest: the student's sigmas are every (teacher_steps / steps)-th teacher sigma."""
    if teacher_steps % steps:
        raise DreamliteError(f"teacher_steps: {teacher_steps} is not a multiple of steps {steps}")
    m = teacher_steps // steps
    teacher = flow_sigmas(teacher_steps, shift)
    return torch.stack([teacher[k * m:(k + 1) * m + 1] for k in range(steps)])


def steps_batch(data: DataSource, t2i: int, edit: int, segments: int, seed: int, step: int,
                latent_shape: tuple[int, int, int]) -> dict:
    """The global batch of ``step``, a pure function of (seed, step): scenes and captions, edits, each sample's
    noise and segment of the student's grid."""
    rng, gen = step_generator(seed, step)
    images, captions = data.t2i(rng, t2i)
    sources, targets, prompts = data.edit(rng, edit)
    n = t2i + edit
    return {"t2i_images": images_to_tensor(images), "t2i_captions": captions,
            "edit_source": images_to_tensor(sources), "edit_target": images_to_tensor(targets),
            "edit_prompts": prompts, "noise": torch.randn((n, *latent_shape), generator=gen),
            "segment": torch.randint(segments, (n,), generator=gen)}


class StepDistillTask(nn.Module):
    """``forward(**steps_batch(...)) -> (loss, logs)``: trains ``student``; the teacher and text encoder are frozen."""

    def __init__(self, student, teacher, text, codec, image_size: int, grids: torch.Tensor, cfg: float,
                 image_cfg: float, in_context: bool = True, teacher_in_context: bool = True):
        super().__init__()
        self.in_context = in_context
        self.student, self.text, self.codec, self.size = student, CachedText(text), codec, image_size
        self.teacher = teacher.requires_grad_(False).eval()
        self.grids, self.cfg, self.image_cfg = grids, cfg, image_cfg
        self.teacher_in_context = teacher_in_context

    @torch.no_grad()
    def _guided(self, x: torch.Tensor, sigma: torch.Tensor, prompts: list[str],
                source: torch.Tensor | None) -> torch.Tensor:
        """The teacher's guided velocity at ``x`` (n, C, h, w)."""
        empty, cond = self.text.encode([""] * len(prompts)), self.text.encode(prompts)
        return guided_flow(self.teacher, x, sigma, empty, cond, source, self.cfg, self.image_cfg, self.size,
                           self.teacher_in_context)

    @torch.no_grad()
    def target(self, x: torch.Tensor, segment: torch.Tensor, prompts: list[str],
               source: torch.Tensor | None) -> torch.Tensor:
        """The velocity that carries ``x`` (each sample at its segment's start) in one Euler step to where the
        teacher's guided Euler steps inside the segment take it. All samples step together, each on its own grid."""
        grid = self.grids[segment]  # (n, m + 1)
        y = x
        for j in range(grid.shape[1] - 1):
            a, b = grid[:, j], grid[:, j + 1]
            y = y + (b - a).view(-1, 1, 1, 1) * self._guided(y, a, prompts, source)
        return (x - y) / (grid[:, 0] - grid[:, -1]).view(-1, 1, 1, 1)

    def _loss(self, x0, noise, segment, prompts, source) -> torch.Tensor:
        sigma = self.grids[segment, 0]
        x = flow_noise(x0, noise, sigma)
        want = self.target(x, segment, prompts, source)
        cond = (torch.zeros_like(x) if source is None else source) if self.in_context else None
        v = flow_call(self.student, x, sigma, self.text.encode(prompts), self.size, cond)
        return (v - want).pow(2).mean(dim=(1, 2, 3))

    def forward(self, t2i_images, t2i_captions, edit_source, edit_target, edit_prompts, noise, segment):
        n, logs, per_sample = len(t2i_captions), {}, []
        if n:
            loss = self._loss(self.codec.encode(t2i_images), noise[:n], segment[:n], list(t2i_captions), None)
            logs["t2i"] = loss.mean().detach()
            per_sample.append(loss)
        if len(edit_prompts):
            loss = self._loss(self.codec.encode(edit_target), noise[n:], segment[n:], list(edit_prompts),
                              self.codec.encode(edit_source))
            logs["edit"] = loss.mean().detach()
            per_sample.append(loss)
        return torch.cat(per_sample).mean(), logs


def teacher_sampling(teacher, s: StepSettings) -> SamplerSettings:
    """How the teacher's trajectories are sampled: its own defaults under the settings' guidance and shift (those
    left out stay the teacher's), ``s.teacher_steps`` steps."""
    return default_settings(teacher).override(steps=s.teacher_steps, cfg=s.cfg, image_cfg=s.image_cfg,
                                              flow_shift=s.flow_shift)


def check_step_pair(student, teacher, s: StepSettings) -> None:
    """Fail before training on a pair that cannot be step-distilled (one line naming the field)."""
    for role, b in (("student", student), ("teacher", teacher)):
        if b.prediction != "flow":
            raise DreamliteError(f"{role}: {b.name} predicts {b.prediction}; step distillation takes a flow-matching "
                                 "model (a recover stage's output)")
    if s.teacher_steps % s.steps:
        raise DreamliteError(f"teacher_steps: {s.teacher_steps} is not a multiple of steps {s.steps} (the student's "
                             "grid must be every k-th point of the teacher's)")
    _, edit = s.counts()
    check_pair(student, teacher, edit > 0)
    if edit and not teacher.in_context:
        raise DreamliteError(f"teacher: {teacher.name} cannot edit (no in-context width); set edit_fraction: 0")


def sampler_defaults(s: StepSettings, flow_shift: float) -> dict:
    """What a step-distilled model's ``dreamlite.json`` records: K steps, guidance 1 (one call per step)."""
    return {"steps": s.steps, "cfg": 1.0, "image_cfg": 1.0, "flow_shift": flow_shift}


def step_distill(student, teacher, s: StepSettings, folder, data: DataSource, seed: int = 0,
                 track=identity_track, log=print) -> dict:
    """Train the ``student`` Bundle in place (resuming from ``folder``'s checkpoint) to sample in ``s.steps`` steps
    without guidance as the ``teacher`` Bundle does with its guidance in ``s.teacher_steps``. The student's
    parameters end as the EMA (or raw) weights and its sampling defaults become ``sampler_defaults``; returns
    fit's summary with the teacher's guidance and shift."""
    check_step_pair(student, teacher, s)
    t = teacher_sampling(teacher, s)
    grids = segment_grids(s.steps, s.teacher_steps, t.flow_shift)
    task = StepDistillTask(student.unet, teacher.unet, student.text, student.codec, student.image_size, grids, t.cfg,
                           t.image_cfg, student.in_context, teacher.in_context)
    latent = (student.unet.config.in_channels, student.latent_size(), student.latent_size())
    t2i, edit = s.counts()

    def batches(step: int) -> dict:
        return steps_batch(data, t2i, edit, s.steps, seed, step, latent)

    task.student.train()
    summary = fit(task, batches, s.train, Path(folder), track, log, description=f"distill to {s.steps} steps")
    task.student.eval()
    student.meta["sampler"] = {**(student.meta.get("sampler") or {}), **sampler_defaults(s, t.flow_shift)}
    return {**summary, "teacher_cfg": t.cfg, "teacher_image_cfg": t.image_cfg, "flow_shift": t.flow_shift}


@dataclass
class GapSet:
    """Held-out prompts and edits with the teacher's guided ``teacher_steps``-step images of them."""
    prompts: list[str]
    teacher_images: np.ndarray
    seed: int
    sources: np.ndarray | None = None
    instructions: list[str] | None = None
    teacher_edits: np.ndarray | None = None


def gap_set(teacher, s: StepSettings, n: int = 4, seed: int = 0) -> GapSet:
    """``n`` prompts per GenEval tag (and ``n`` edits per ImgEdit type when the teacher edits), from seeds the
    benchmarks do not use, sampled by the teacher as step distillation's targets are: guided, ``s.teacher_steps``
    Euler steps."""
    from dreamlite.evaluation.geneval import gen_prompts
    from dreamlite.evaluation.shapes import render
    from dreamlite.evaluation.shapes.world import EDIT_TYPES, sample_edit
    from dreamlite.models.sampler import edit

    ref = replace(teacher_sampling(teacher, s), seed=seed)
    prompts = [p.prompt for p, _ in gen_prompts(n, seed + 41)]
    out = GapSet(prompts, generate(teacher, prompts, ref), seed)
    if teacher.in_context:
        rng = np.random.default_rng([seed, 43])
        records = [sample_edit(rng, t) for t in EDIT_TYPES for _ in range(n)]
        out.sources = np.stack([render(r.source, teacher.image_size) for r in records])
        out.instructions = [r.prompt for r in records]
        out.teacher_edits = edit(teacher, out.sources, out.instructions, ref)
    return out


def trajectory_gap(model, ref: GapSet, settings: SamplerSettings | None = None) -> dict:
    """How far ``model``'s sampling with ``settings`` (default: its own defaults) lands from the teacher's in
    ``ref``, from the same noise: the mean squared difference of the images in [-1, 1], per task."""
    from dreamlite.models.sampler import edit

    mine = replace(settings or default_settings(model), seed=ref.seed)

    def mse(a: np.ndarray, b: np.ndarray) -> float:
        return float((((a.astype(np.float32) - b.astype(np.float32)) / 127.5) ** 2).mean())

    out = {"t2i": mse(generate(model, ref.prompts, mine), ref.teacher_images)}
    if ref.sources is not None and model.in_context:
        out["edit"] = mse(edit(model, ref.sources, ref.instructions, mine), ref.teacher_edits)
    return out
