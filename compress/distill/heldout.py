"""Held-out flow-matching losses of an in-context student: a deterministic, low-noise measure of recovery that a
judge cannot give while samples are still poor (the judge scores near its floor for weak students).

On a fixed held-out set (the same samples and noise for every model), at fixed sigmas: the velocity loss
``|v - (eps - x0)|^2`` for text-to-image (cond = zeros) and for editing (cond = the source latent), and the editing
loss again with the source replaced by zeros. ``source_gain`` = loss without the source - loss with it: how much the
student reads the context beside the target (0: it ignores the source and edits by guessing). The source matters
where the noisy target no longer shows the layout: on the shapes world only above sigma 0.9, so the grid starts at
1, where sampling starts. ``copy_source`` is the loss at sigma 1 of the predictor that returns the source as the
clean image (the mean squared source-target difference): an editor that reads its source well beats it there.
"""
from __future__ import annotations

import numpy as np
import torch

from dreamlite.data import DataSource, images_to_tensor
from dreamlite.io import DreamliteError

from .flow import flow_noise, flow_velocity
from .recover import FlowView, flow_call

SIGMAS = (1.0, 0.95, 0.9, 0.7, 0.5, 0.3, 0.1)
HELD_OUT_SEED = 9_000_017  # far from any recipe's training seeds (training draws from (seed, step, phase))


def held_out_draws(seed: int = HELD_OUT_SEED) -> tuple[np.random.Generator, torch.Generator]:
    """The generators of a held-out set: which samples (numpy) and their noise (torch)."""
    return np.random.default_rng([seed, 0]), torch.Generator().manual_seed(seed)


def held_out_t2i(bundle, data: DataSource, n: int, rng: np.random.Generator, gen: torch.Generator):
    """``n`` text-to-image samples through ``bundle``'s codec and text encoder: clean latents (B, C, h, w), their
    noise, and the captions' text states. Drawn first from ``held_out_draws``, they are every model's same set."""
    images, captions = data.t2i(rng, n)
    x0 = bundle.codec.encode(images_to_tensor(images))
    return x0, torch.randn(x0.shape, generator=gen), bundle.text.encode(captions)


@torch.no_grad()
def held_out_losses(bundle, data: DataSource, n: int = 32, sigmas=SIGMAS, seed: int = HELD_OUT_SEED,
                    batch: int = 16, tasks=("t2i", "edit")) -> dict:
    """{"t2i", "edit", "edit_without_source", "source_gain", "copy_source"}: each {"mean": float,
    "per_sigma": {sigma: float}} (``copy_source`` at sigma 1 only),
    over ``n`` text-to-image and ``n`` editing samples drawn from ``data`` with ``seed``. The student is
    ``bundle.unet``; the editing rows need in-context width and ``"edit"`` in ``tasks`` (data without edit triplets
    leaves it out), the text-to-image row ``"t2i"``. The U-Net is put back in its training mode after."""
    rng, gen = held_out_draws(seed)
    t2i = held_out_t2i(bundle, data, n, rng, gen) if "t2i" in tasks else None
    edits = bundle.in_context and "edit" in tasks
    sources, targets, prompts = data.edit(rng, n) if edits else ([], [], [])
    unet, was_training = bundle.unet, bundle.unet.training
    unet.eval()
    size = bundle.image_size

    def loss(x0, cond, text, noise, sigma: float) -> float:
        out = []
        for k in range(0, len(x0), batch):
            s = torch.full((len(x0[k:k + batch]),), sigma)
            x = flow_noise(x0[k:k + batch], noise[k:k + batch], s)
            v = flow_call(unet, x, s, text[k:k + batch], size, cond[k:k + batch] if bundle.in_context else None)
            out.append((v - flow_velocity(x0[k:k + batch], noise[k:k + batch])).pow(2))
        return torch.cat(out).mean().item()

    rows = {}
    if t2i is not None:
        x0, noise, text = t2i
        rows["t2i"] = [loss(x0, torch.zeros_like(x0), text, noise, s) for s in sigmas]
    if edits:
        x0, src = bundle.codec.encode(images_to_tensor(targets)), bundle.codec.encode(images_to_tensor(sources))
        noise, text = torch.randn(x0.shape, generator=gen), bundle.text.encode(prompts)
        rows["edit"] = [loss(x0, src, text, noise, s) for s in sigmas]
        rows["edit_without_source"] = [loss(x0, torch.zeros_like(src), text, noise, s) for s in sigmas]
        rows["source_gain"] = [a - b for a, b in zip(rows["edit_without_source"], rows["edit"])]
    unet.train(was_training)
    out = {k: {"mean": round(float(np.mean(v)), 5), "per_sigma": {str(s): round(x, 5) for s, x in zip(sigmas, v)}}
           for k, v in rows.items()}
    if edits:  # at sigma 1 the input is pure noise: x0 = source gives the velocity error (target - source)
        copy = round((x0 - src).pow(2).mean().item(), 5)
        out["copy_source"] = {"mean": copy, "per_sigma": {"1.0": copy}}
    return out


@torch.no_grad()
def teacher_held_out_losses(teacher, data: DataSource, n: int = 32, sigmas=SIGMAS, seed: int = HELD_OUT_SEED,
                            batch: int = 16, student=None) -> dict:
    """{"t2i": {"mean", "per_sigma"}}: ``held_out_losses``' text-to-image row for the ``teacher`` Bundle (the same
    samples and noise), its prediction seen as a flow velocity (``FlowView``). A sigma beyond the teacher's schedule
    is None and left out of the mean. ``student``: a Bundle whose text encoder and codec to use (distillation shares
    them), else the teacher's."""
    x0, noise, text = held_out_t2i(student or teacher, data, n, *held_out_draws(seed))
    view = FlowView(teacher.unet, teacher.prediction, teacher.schedule, teacher.in_context, teacher.image_size)
    was_training = teacher.unet.training
    teacher.unet.eval()
    per_sigma = {}
    for sigma in sigmas:
        s = torch.full((n,), sigma)
        if view.convert is not None and not bool(view.convert.in_range(s).all()):
            per_sigma[str(sigma)] = None
            continue
        x = flow_noise(x0, noise, s)
        v = torch.cat([view(x[k:k + batch], s[k:k + batch], text[k:k + batch])[0] for k in range(0, n, batch)])
        per_sigma[str(sigma)] = round((v - flow_velocity(x0, noise)).pow(2).mean().item(), 5)
    teacher.unet.train(was_training)
    reached = [x for x in per_sigma.values() if x is not None]
    return {"t2i": {"mean": round(float(np.mean(reached)), 5) if reached else None, "per_sigma": per_sigma}}


def teacher_worse_from(teacher: dict, student: dict) -> float | None:
    """The lowest sigma at which the teacher's held-out text-to-image loss is above the student's (each a
    ``{"per_sigma": ...}`` row): from there up, output distillation pulls toward a worse target than the data's.
    None when the teacher is better wherever its schedule reaches."""
    worse = [float(s) for s, t in teacher["per_sigma"].items()
             if t is not None and s in student["per_sigma"] and t > student["per_sigma"][s]]
    return min(worse) if worse else None


def held_out_report(models: dict, data: DataSource, teacher=None, n: int = 32, tasks=("t2i", "edit")) -> dict:
    """Several models on the same held-out samples and noise: {"models": {name: rows}}. A flow model gets
    ``held_out_losses``' rows, an epsilon or v model its text-to-image row seen as a flow velocity. With a
    ``teacher`` Bundle, also "teacher" (its row) and "teacher_worse_from_sigma" ({name: sigma or None})."""
    every = [*models.values(), *([teacher] if teacher is not None else [])]
    if len({b.image_size for b in every}) > 1:
        raise DreamliteError("held-out losses compare models on the same samples; these work at "
                             + ", ".join(f"{b.name} {b.image_size} px" for b in every))
    for b in every:
        if b.text is None or b.codec is None:
            raise DreamliteError(f"{b.name}: held-out losses need a text encoder and a codec beside the U-Net")
        if b.prediction != "flow" and "t2i" not in tasks:
            raise DreamliteError(f"{b.name}: an {b.prediction} model is measured on text-to-image samples; the data "
                                 "has none")
    out = {"models": {name: held_out_losses(b, data, n, tasks=tasks) if b.prediction == "flow"
                      else teacher_held_out_losses(b, data, n) for name, b in models.items()}}
    if teacher is not None and "t2i" in tasks:
        out["teacher"] = teacher_held_out_losses(teacher, data, n)
        out["teacher_worse_from_sigma"] = {name: teacher_worse_from(out["teacher"]["t2i"], rows["t2i"])
                                           for name, rows in out["models"].items()}
    return out
