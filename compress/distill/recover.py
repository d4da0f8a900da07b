"""Recovery training (DreamLite): task-progressive joint pretraining of a pruned in-context student with flow
matching, text-to-image then editing then both, distilled from the server teacher on text-to-image samples.

In-context (../shared/ANCHORS.md): the student sees ``cat([noisy_target, cond], width)`` with ``cond`` zeros to
generate and the clean source latent to edit; only the target half is noised and the loss is taken on it.
Losses per sample: the flow-matching task loss ``|v_s - (eps - x0)|^2`` on every sample; on text-to-image samples
also output distillation ``|v_s - v_teacher|^2`` (the teacher's epsilon converted by ``flow.EpsilonToFlow``, where
its schedule reaches) and feature distillation (``features.FeatureProjector``). Editing samples use the task loss
alone: the server teacher cannot edit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import torch
import torch.nn as nn

from dreamlite.data import DataSource, images_to_tensor
from dreamlite.io import DreamliteError, identity_track
from dreamlite.models.conditioning import unet_inputs
from dreamlite.models.sampler import SamplerSettings, guidance_branches, guide
from dreamlite.models.teacher import step_generator
from dreamlite.models.text import TextStates
from dreamlite.train import fit

from .config import LossWeights, Phase
from .features import PROJECTIONS, FeatureProjector, Taps, matching_blocks
from .flow import (EpsilonToFlow, SigmaSampling, flow_noise, flow_timestep, flow_velocity, sample_sigmas,
                   shift_sigmas)


@dataclass(frozen=True)
class BatchSpec:
    """How the samples of one step are drawn."""
    t2i: int  # text-to-image samples per global batch
    edit: int  # editing samples per global batch
    caption_dropout: float = 0.1  # text-to-image: empty caption
    text_dropout: float = 0.05  # editing: empty instruction (learns the image branch of 3-way guidance)
    image_dropout: float = 0.05  # editing: zero source latent (and, with the text also dropped, the unconditional)
    sigma_sampling: SigmaSampling = "logit-normal"
    shift: float = 1.0
    edit_shift: float | None = None  # editing samples' shift (None: ``shift``); the source matters at high noise
    identity: float = 0.0  # editing: target = source, empty instruction (the image branch learns to copy)


def recover_batch(data: DataSource, spec: BatchSpec, seed: int, step: int, latent_shape: tuple[int, int, int],
                  stream: int = 0) -> dict:
    """The global batch of ``step``, a pure function of (seed, step): images in [-1, 1], captions, noise (target
    half only), sigmas, and which editing samples keep their source."""
    rng, gen = step_generator(seed, step, stream)
    images, captions = data.t2i(rng, spec.t2i)
    captions = ["" if rng.random() < spec.caption_dropout else c for c in captions]
    sources, targets, prompts = data.edit(rng, spec.edit)
    prompts = ["" if rng.random() < spec.text_dropout else p for p in prompts]
    keep = torch.tensor([float(rng.random() >= spec.image_dropout) for _ in range(spec.edit)])
    if spec.identity:  # drawn last, so that batches without identity edits stay as they were
        same = [rng.random() < spec.identity for _ in range(spec.edit)]
        targets = [s if k else t for s, t, k in zip(sources, targets, same)]
        prompts = ["" if k else p for p, k in zip(prompts, same)]
    n = spec.t2i + spec.edit
    base = sample_sigmas(n, gen, spec.sigma_sampling)
    edit_shift = spec.shift if spec.edit_shift is None else spec.edit_shift
    sigmas = torch.cat([shift_sigmas(base[:spec.t2i], spec.shift), shift_sigmas(base[spec.t2i:], edit_shift)])
    noise = torch.randn((n, *latent_shape), generator=gen)
    return {"t2i_images": images_to_tensor(images), "t2i_captions": captions, "t2i_noise": noise[:spec.t2i],
            "t2i_sigma": sigmas[:spec.t2i], "edit_source": images_to_tensor(sources),
            "edit_target": images_to_tensor(targets), "edit_prompts": prompts, "edit_noise": noise[spec.t2i:],
            "edit_sigma": sigmas[spec.t2i:], "edit_keep_source": keep}


def flow_call(unet, x: torch.Tensor, sigma: torch.Tensor, text: TextStates, image_size: int,
              cond: torch.Tensor | None = None, convert: EpsilonToFlow | None = None,
              prediction: str = "flow") -> torch.Tensor:
    """A U-Net's velocity (float) at the flow sample ``x`` (B, C, h, w) of the target half: it sees
    ``cat([x, cond], width)`` when ``cond`` is given (an in-context model), ``x`` alone otherwise. A flow model is
    called as it is; an epsilon or v model (``convert``: its schedule's ``EpsilonToFlow``, ``prediction``) at its
    timestep of equal SNR, on the rescaled sample, its output converted to the velocity."""
    xin = x if convert is None else convert.teacher_input(x, sigma)
    t = flow_timestep(sigma) if convert is None else convert.timestep(sigma)
    out = unet(xin if cond is None else torch.cat([xin, cond], dim=-1), t,
               **unet_inputs(unet.config, text, image_size, image_size)).sample[..., : x.shape[-1]].float()
    if convert is None:
        return out
    return convert.velocity(out, x, sigma, prediction)


def guided_flow(unet, x: torch.Tensor, sigma: torch.Tensor, empty: TextStates, cond: TextStates,
                source: torch.Tensor | None, cfg: float, image_cfg: float, image_size: int,
                in_context: bool = True, convert: EpsilonToFlow | None = None,
                prediction: str = "flow") -> torch.Tensor:
    """A U-Net's guided velocity at ``x`` (n, C, h, w), every branch in one call (the sampler's branches):
    [empty, prompt] beside zeros to generate, [(empty, zeros), (empty, source), (prompt, source)] to edit; one call
    with the prompt where guidance is 1 (a guidance-distilled model). ``empty``, ``cond``: the n samples' text.
    ``convert``, ``prediction``: an epsilon or v model, as ``flow_call``."""
    zeros = torch.zeros_like(x)
    if guidance_branches(SamplerSettings(cfg=cfg, image_cfg=image_cfg), source is not None) == 1:
        branches = [(cond, zeros if source is None else source)]
    elif source is None:
        branches = [(empty, zeros), (cond, zeros)]
    else:
        branches = [(empty, zeros), (empty, source), (cond, source)]
    xs = torch.cat([x] * len(branches))
    ctx = torch.cat([c for _, c in branches]) if in_context else None
    out = flow_call(unet, xs, sigma.repeat(len(branches)), TextStates.cat([t for t, _ in branches]), image_size, ctx,
                    convert, prediction)
    return guide(list(out.chunk(len(branches))), cfg, image_cfg)


class FlowView:
    """Any U-Net seen as a flow-matching velocity field: ``view(x, sigma, text) -> (v, valid)`` at the flow sample
    ``x`` (B, C, h, w) of the target half. A flow model is called as it is (zeros beside the target when it is
    in-context); an epsilon or v model at its timestep of equal SNR (``EpsilonToFlow``), its output converted, and
    ``valid`` (B,) marks the sigmas its schedule reaches."""

    def __init__(self, unet, prediction: str = "flow", schedule: str = "sdxl", in_context: bool = False,
                 image_size: int = 64):
        self.unet, self.prediction, self.in_context, self.size = unet, prediction, in_context, image_size
        self.convert = EpsilonToFlow.for_schedule(schedule, prediction) if prediction != "flow" else None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, text: TextStates):
        cond = torch.zeros_like(x) if self.in_context else None
        v = flow_call(self.unet, x, sigma, text, self.size, cond, self.convert, self.prediction)
        return v, (torch.ones_like(sigma) if self.convert is None else self.convert.in_range(sigma).float())


class CachedText(nn.Module):
    """A frozen text encoder with its states cached per caption (captions repeat; the encoder never changes)."""

    def __init__(self, encoder, capacity: int = 4096):
        super().__init__()
        self.encoder, self.capacity = encoder, capacity
        self.encoder.requires_grad_(False).eval()
        self.cache: dict[str, TextStates] = {}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextStates:
        new = sorted({p for p in prompts if p not in self.cache})
        if len(self.cache) + len(new) > self.capacity:  # full: start over (before encoding, so this batch stays)
            self.cache.clear()
            new = sorted(set(prompts))
        if new:
            states = self.encoder.encode(new)
            self.cache |= {p: states[i:i + 1] for i, p in enumerate(new)}
        return TextStates.cat([self.cache[p] for p in prompts])


class RecoverTask(nn.Module):
    """``forward(**recover_batch(...)) -> (loss, logs)``. Trains ``student`` (and the feature projections); the
    teacher and the text encoder are frozen."""

    def __init__(self, student, text, codec, image_size: int, in_context: bool = True, teacher=None,
                 teacher_prediction: str = "epsilon", teacher_schedule: str = "sdxl", teacher_in_context: bool = False,
                 weights: LossWeights = LossWeights(), projector: FeatureProjector | None = None):
        super().__init__()
        self.student, self.text, self.codec, self.size = student, CachedText(text), codec, image_size
        self.in_context = in_context
        self.weights = weights
        self.teacher = teacher
        self.projector = None
        if teacher is not None:
            teacher.requires_grad_(False).eval()
            self.teacher_view = FlowView(teacher, teacher_prediction, teacher_schedule, teacher_in_context, image_size)
            blocks = matching_blocks(student.config, teacher.config)
            if projector is not None and projector.names != list(blocks):
                raise DreamliteError(f"feature projections: given for blocks {projector.names}, the pair has "
                                     f"{list(blocks)}")
            self.projector = projector if projector is not None else FeatureProjector(blocks)
            self.student_taps, self.teacher_taps = Taps(student, blocks), Taps(teacher, blocks)

    def _student(self, x: torch.Tensor, cond: torch.Tensor, sigma: torch.Tensor, text: TextStates) -> torch.Tensor:
        """Velocity on the target half of ``cat([x, cond], width)`` (B, C, h, w); ``cond`` is unused by a student
        without in-context width. ``self.student`` is read at each call: FSDP swaps it for a sharded twin."""
        return flow_call(self.student, x, sigma, text, self.size, cond if self.in_context else None)

    def forward(self, t2i_images, t2i_captions, t2i_noise, t2i_sigma, edit_source, edit_target, edit_prompts,
                edit_noise, edit_sigma, edit_keep_source):
        w, logs, per_sample = self.weights, {}, []
        if len(t2i_captions):
            x0 = self.codec.encode(t2i_images)
            x = flow_noise(x0, t2i_noise, t2i_sigma)
            text = self.text.encode(list(t2i_captions))
            v = self._student(x, torch.zeros_like(x), t2i_sigma, text)
            task = (v - flow_velocity(x0, t2i_noise)).pow(2).mean(dim=(1, 2, 3))
            logs["t2i"] = task.mean().detach()
            extra = torch.zeros_like(task)
            if self.teacher is not None and (w.output or w.feature):
                student_feats = self.student_taps.pop(self.in_context)
                with torch.no_grad():
                    v_t, valid = self.teacher_view(x, t2i_sigma, text)
                teacher_feats = self.teacher_taps.pop(self.teacher_view.in_context)
                if w.output:
                    kd = (v - v_t).pow(2).mean(dim=(1, 2, 3)) * valid
                    extra = extra + w.output * kd
                    logs["kd_out"] = kd.mean().detach()
                if w.feature:
                    feat = self.projector(student_feats, teacher_feats)
                    extra = extra + w.feature * feat
                    logs["kd_feat"] = feat.mean().detach()
            per_sample.append(w.task * task + extra)
        if len(edit_prompts):
            x0, src = self.codec.encode(edit_target), self.codec.encode(edit_source)
            x = flow_noise(x0, edit_noise, edit_sigma)
            cond = src * edit_keep_source.view(-1, 1, 1, 1)
            v = self._student(x, cond, edit_sigma, self.text.encode(list(edit_prompts)))
            task = (v - flow_velocity(x0, edit_noise)).pow(2).mean(dim=(1, 2, 3))
            logs["edit"] = task.mean().detach()
            per_sample.append(w.task * task)
        if self.teacher is not None:
            self.student_taps.pop(), self.teacher_taps.pop()
        return torch.cat(per_sample).mean(), logs

    def close(self) -> None:
        """Remove the feature hooks from both U-Nets (they outlive training otherwise)."""
        if self.teacher is not None:
            self.student_taps.remove(), self.teacher_taps.remove()


def check_pair(student_bundle, teacher_bundle, edits: bool) -> None:
    """Fail before training on a student that cannot be trained as asked (one line naming the field)."""
    sb = student_bundle
    if sb.text is None or sb.codec is None:
        raise DreamliteError(f"{sb.name}: the student needs a text encoder and a codec beside its U-Net")
    if edits and not sb.in_context:
        raise DreamliteError(f"{sb.name}: editing needs an in-context student (DreamLite layout, "
                             f"cat([target, source], width)); this is a {type(sb.unet).__name__}")
    text_width = sb.text.width
    wants = sb.unet.config.get("encoder_hid_dim") or sb.unet.config["cross_attention_dim"]
    if wants != text_width:
        raise DreamliteError(f"{sb.name}: the U-Net takes {wants}-wide text states and its text encoder gives "
                             f"{text_width}")
    if teacher_bundle is None:
        return
    tb = teacher_bundle
    if tb.prediction != "flow":
        try:
            EpsilonToFlow.for_schedule(tb.schedule, tb.prediction)  # before training: what cannot be converted
        except DreamliteError as e:
            raise DreamliteError(f"teacher: {tb.name}: {e}") from None
    t_wants = tb.unet.config.get("encoder_hid_dim") or tb.unet.config["cross_attention_dim"]
    if t_wants != text_width:
        raise DreamliteError(f"teacher: {tb.name} takes {t_wants}-wide text states and the student's text encoder "
                             f"gives {text_width}: distillation needs one text encoder for both")
    if tb.text is not None and tb.text.pooled_width != sb.text.pooled_width:
        raise DreamliteError(f"teacher: {tb.name}'s pooled text is {tb.text.pooled_width} wide, the student's "
                             f"{sb.text.pooled_width}")
    if _text_differs(sb.text, tb.text):
        raise DreamliteError(f"teacher: {tb.name}'s text encoder differs from the student's: distillation needs the "
                             "one the teacher was trained with beside the student")
    if tb.image_size != sb.image_size or tb.latent_size() != sb.latent_size():
        raise DreamliteError(f"teacher: {tb.name} works at {tb.image_size} px, the student at {sb.image_size} px")



def _text_differs(a, b) -> bool:
    """Two text encoders with weights (torch modules) whose tensors are not all equal."""
    if not (isinstance(a, nn.Module) and isinstance(b, nn.Module)):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k]) for k in sa)


def _distils_features(phases: list[Phase]) -> bool:
    return any(p.weights.feature and p.task != "edit" for p in phases)


def _fresh_note(why: str) -> str:
    return (f"note: the student was recovered before and its feature projections start fresh ({why}); while they "
            "are random they pull its features (docs/recovery.md, 'More steps from the recovered student'); "
            "weights.feature 0 continues without them")


def saved_projector(student, teacher, phases: list[Phase], log=print) -> FeatureProjector | None:
    """The feature projections for ``recover(..., projector=)``: None when no phase distils features; else fresh
    ones (initialised from torch's RNG), continued from the file a recover stage wrote beside a recovered student's
    ``model/`` folder (``PROJECTIONS``) when it maps the same blocks onto the same teacher."""
    if teacher is None or not _distils_features(phases):
        return None
    projector = FeatureProjector(matching_blocks(student.unet.config, teacher.unet.config))
    if student.meta.get("stage") == "recover":
        where = Path(student.folder).parent / PROJECTIONS if student.folder else None
        why = projector.load(where, teacher.name) if where else "the student has no folder"
        log(f"continuing the feature projections saved in {where}" if why is None else _fresh_note(why))
    return projector


def recover(student, teacher, phases: list[Phase], folder, data: DataSource, seed: int = 0,
            sigma_sampling: SigmaSampling = "logit-normal", shift: float = 1.0, edit_shift: float | None = None,
            track=identity_track, log=print, projector: FeatureProjector | None = None) -> list[dict]:
    """Train the ``student`` Bundle in place through ``phases`` in order (each resumes from its own checkpoint in
    ``folder/NN-task``), distilling from the ``teacher`` Bundle (or None). The student's parameters end as the last
    phase's EMA. ``shift`` / ``edit_shift``: the training sigmas' shift for text-to-image / editing samples
    (``edit_shift`` None: the same). ``projector``: the feature projections to train, ending as the last phase's
    EMA (None: ``saved_projector``'s, which the caller then cannot save). Returns one training summary per phase."""
    check_pair(student, teacher, any(p.task != "t2i" for p in phases))
    if projector is None:
        projector = saved_projector(student, teacher, phases, log)
    wants_teacher = any(p.weights.output or p.weights.feature for p in phases if p.task != "edit")
    task = RecoverTask(student.unet, student.text, student.codec, student.image_size, student.in_context,
                       teacher.unet if teacher is not None and wants_teacher else None,
                       *((teacher.prediction, teacher.schedule, teacher.in_context) if teacher else ()),
                       projector=projector)
    task.student.train()
    latent = (student.unet.config.in_channels, student.latent_size(), student.latent_size())
    summaries = []
    try:
        for i, phase in enumerate(phases):
            spec = BatchSpec(*phase.counts(), phase.caption_dropout, phase.text_dropout, phase.image_dropout,
                             sigma_sampling, shift, edit_shift, phase.identity_fraction)
            task.weights = phase.weights
            if task.projector is not None:  # trained only where used: DDP needs every trainable tensor in the graph
                task.projector.requires_grad_(bool(phase.weights.feature) and phase.task != "edit")

            def batches(step: int, spec=spec, i=i) -> dict:
                return recover_batch(data, spec, seed, step, latent, stream=i)

            out = Path(folder) / f"{i + 1:02d}-{phase.task}"
            summaries.append({"phase": phase.task, **fit(task, batches, phase.train, out, track, log,
                                                         description=f"recover {phase.task}")})
    finally:
        task.close()  # the feature hooks must not outlive training (sampling, export, a second recover())
    task.student.eval()
    return summaries
