"""Reward fine-tuning, DreamLite's post-training RL: GRPO on the flow sampler's own trajectories (Flow-GRPO, Liu et
al. 2025; DanceGRPO, Xue et al. 2025), with the reward of a judge instead of a learned preference model.

Each prompt (or edit) is sampled ``group`` times with the model's guided flow sampler on a ``steps``-step grid
whose first ``sde_steps`` steps are made stochastic: Euler's step becomes DDIM's step with noise ``eta`` on the
flow path, a Gaussian transition whose mean the model sets (``ddim_step``). The rest stay Euler. The layout of an
image is decided in those first, noisiest steps. A reward scores each image; its advantage is the reward
normalised within its group. The loss is ``-A log p(x_next | x, prompt)`` over the stochastic steps: it makes the
transitions that led to better-than-average images more likely. Each batch is sampled by the current weights and
used for one update, so PPO's ratio is 1 and its clip never binds: this is GRPO's gradient with one update per
batch. ``kl`` adds Flow-GRPO's per-step KL to the starting model, ``|mean - mean_ref|^2 / (2 std^2)``.
An epsilon or v server is trained on its clipped DDIM path seen on the flow path (``trajectory``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dreamlite.data import images_to_tensor
from dreamlite.io import DreamliteError, identity_track
from dreamlite.models.codec import to_uint8
from dreamlite.models.sampler import (SamplerSettings, checked, default_settings, edit, generate, initial_noise,
                                      make_scheduler)
from dreamlite.models.teacher import step_generator
from dreamlite.models.text import TextStates
from dreamlite.train import TrainSettings, fit

from .flow import EpsilonToFlow, _b
from .recover import CachedText, check_pair, guided_flow
from .steps import flow_sigmas


class RLSettings(BaseModel):
    """How reward fine-tuning samples and learns; a guidance or shift left out is the model's sampling default."""
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(10, ge=2, le=100, description="sampling steps of the training trajectories")
    sde_steps: int = Field(3, ge=1, description="the first steps made stochastic and trained (fewer than steps)")
    eta: float = Field(1.0, gt=0, le=1, description="noise of the stochastic steps (1: DDPM's posterior)")
    group: int = Field(8, ge=2, description="images per prompt or edit; advantages are taken within a group")
    cfg: float | None = Field(None, ge=0, description="text guidance of sampling (default: the model's)")
    image_cfg: float | None = Field(None, ge=0, description="image guidance when editing (default: the model's)")
    flow_shift: float | None = Field(None, gt=0, description="sigma shift of the grid (default: the model's)")
    edit_fraction: float = Field(0.5, ge=0, le=1, description="editing share of each batch's groups")
    kl: float = Field(0.0, ge=0, description="weight of the per-step KL to the starting model (0: no reference)")
    train: TrainSettings

    @model_validator(mode="after")
    def _shape(self):
        if self.sde_steps >= self.steps:
            raise ValueError(f"sde_steps: {self.sde_steps} must be fewer than steps {self.steps} (the last step "
                             "lands on the clean image and has no noise)")
        if self.train.batch % self.group:
            raise ValueError(f"train.batch: {self.train.batch} images is not a whole number of groups of {self.group}")
        return self

    def counts(self) -> tuple[int, int]:
        """(generation, editing) groups per global batch."""
        groups = self.train.batch // self.group
        edit_groups = round(groups * self.edit_fraction)
        return groups - edit_groups, edit_groups


# ------------------------------------------------------------------------------------------------------- maths
def ddim_step(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
              eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM's step (Song et al. 2021) on the flow path ``x_s = (1 - s) x0 + s eps`` from ``sigma`` to
    ``sigma_next`` (B,): the mean (B, C, h, w) and std (B, 1, 1, 1) of ``x_next``. ``eta`` 0 is Euler's step
    exactly; 1 is the posterior ``q(x_next | x, x0)``, whose std is ``s' sqrt(1 - ((1 - s) s' / ((1 - s') s))^2)``."""
    s, t = _b(sigma, x0), _b(sigma_next, x0)
    ratio = (1 - s) * t / ((1 - t) * s)
    std = eta * t * (1 - ratio ** 2).clamp(min=0).sqrt()
    mean = (1 - t) * x0 + (t ** 2 - std ** 2).clamp(min=0).sqrt() * eps
    return mean, std


def gaussian_logp(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B,) the log-density of ``x`` under N(mean, std^2), averaged over each sample's elements."""
    return (-(x - mean) ** 2 / (2 * std ** 2) - std.log() - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(P, G) rewards -> advantages normalised within each group (GRPO); a group whose rewards are all equal
    gets 0."""
    mean, std = rewards.mean(dim=1, keepdim=True), rewards.std(dim=1, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + 1e-4)


def estimates(v: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean and noise estimates ``(x0, eps)`` of a velocity ``v`` at the flow sample ``x``: ``x0 = x - s v``,
    ``eps = x + (1 - s) v``. ``clip``: ``x0`` clipped to [-1, 1] and ``eps`` re-derived from it, as the sampler's
    clipped DDIM does (``use_clipped_model_output``)."""
    s = _b(sigma, x)
    if not clip:
        return x - s * v, x + (1 - s) * v
    x0 = (x - s * v).clamp(-1, 1)
    return x0, (x - (1 - s) * x0) / s


@torch.no_grad()
def rollout(predict: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor,
            sigmas: torch.Tensor, sde_steps: int, eta: float,
            generators: list[torch.Generator]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sample from ``x`` (B, C, h, w) at ``sigmas[0]`` over ``sigmas`` (N + 1,), ``predict(x, sigma) -> (x0, eps)``:
    the first ``sde_steps`` steps by ``ddim_step`` with noise from each image's generator, the rest deterministic
    (eta 0: Euler's step, or DDIM's with clipped estimates). Returns the states before and after each stochastic
    step (sde_steps + 1 of them) and the final latent."""
    states = [x]
    for k in range(len(sigmas) - 1):
        s, t = sigmas[k].expand(x.shape[0]), sigmas[k + 1].expand(x.shape[0])
        stochastic = k < sde_steps
        mean, std = ddim_step(*predict(x, s), s, t, eta if stochastic else 0.0)
        if stochastic:
            z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])
            x = mean + std * z
            states.append(x)
        else:
            x = mean
    return states, x


@dataclass(frozen=True)
class Trajectory:
    """The path the model's deterministic sampler takes, on the flow path: ``sigmas`` (N + 1,) from the first noise
    level to 0, the scale of the initial noise there, and how the model's output becomes a velocity."""
    sigmas: torch.Tensor
    noise_scale: float = 1.0  # an epsilon model starts at its last timestep: x_T = eps is sqrt((1-s)^2 + s^2) eps here
    convert: EpsilonToFlow | None = None  # an epsilon or v model: its schedule (None: a flow model)
    prediction: str = "flow"
    clip: bool = False  # clean estimates clipped to [-1, 1] (clipped DDIM; the flow sampler's Euler does not clip)


def trajectory(model, s: SamplerSettings) -> Trajectory:
    """``s.steps`` steps of the model's deterministic sampler seen on the flow path: flow-matching Euler on the grid
    shifted by ``s.flow_shift`` for a flow model; for an epsilon or v model, DDIM on its training schedule (trailing
    timesteps, the last step to the clean estimate), clipped if ``s.clip``. DDIM is Euler on the flow path at the
    sigmas of equal SNR."""
    if model.prediction == "flow":
        return Trajectory(flow_sigmas(s.steps, s.flow_shift))
    convert = EpsilonToFlow.for_schedule(model.schedule, model.prediction)
    timesteps = make_scheduler(model.prediction, s.steps, "ddim", schedule=model.schedule).timesteps
    sigmas = torch.cat([convert.sigma_of(convert.log_snr[timesteps]).float(), torch.zeros(1)])
    s0 = float(sigmas[0])
    return Trajectory(sigmas, math.sqrt((1 - s0) ** 2 + s0 ** 2), convert, model.prediction, bool(s.clip))


# -------------------------------------------------------------------------------------------------------- task
def rl_batch(source, gen_groups: int, edit_groups: int, seed: int, step: int) -> dict:
    """The global batch of ``step``, a pure function of (seed, step): prompts and edits (one per group), the
    edits' source images and each group's noise seed."""
    rng, gen = step_generator(seed, step)
    prompts, edits = source.prompts(rng, gen_groups), source.edits(rng, edit_groups)
    seeds = torch.randint(2 ** 31, (gen_groups + edit_groups,), generator=gen)
    return {"gen_items": prompts, "gen_seed": seeds[:gen_groups], "edit_items": edits,
            "edit_source": images_to_tensor([source.source_image(e) for e in edits]), "edit_seed": seeds[gen_groups:]}


class GRPOTask(nn.Module):
    """``forward(**rl_batch(...)) -> (loss, logs)``: samples groups with the current weights, scores them with
    ``source`` and returns GRPO's loss on the stochastic steps. Trains ``model``; text encoder and reference frozen."""

    def __init__(self, model, text, codec, image_size: int, latent: tuple[int, int, int], source, path: Trajectory,
                 s: RLSettings, cfg: float, image_cfg: float, in_context: bool = True, reference=None):
        super().__init__()
        self.model, self.text, self.codec, self.size, self.source = model, CachedText(text), codec, image_size, source
        self.latent, self.path = latent, path
        self.s, self.cfg, self.image_cfg, self.in_context = s, cfg, image_cfg, in_context
        self.reference = reference.requires_grad_(False).eval() if reference is not None else None

    def _predict(self, unet, x, sigma, empty: TextStates, cond: TextStates,
                 source) -> tuple[torch.Tensor, torch.Tensor]:
        """The guided clean and noise estimates at the flow sample ``x``, as the model's sampler makes them."""
        p = self.path
        v = guided_flow(unet, x, sigma, empty, cond, source, self.cfg, self.image_cfg, self.size, self.in_context,
                        p.convert, p.prediction)
        return estimates(v, x, sigma, p.clip)

    def _groups(self, items, seeds: torch.Tensor, sources: torch.Tensor | None, score) -> tuple[torch.Tensor, dict]:
        g, k = self.s.group, self.s.sde_steps
        items = [it for it in items for _ in range(g)]
        n = len(items)
        cond = self.text.encode([self.source.prompt_text(it) for it in items])
        empty = self.text.encode([""] * n)
        src = None if sources is None else self.codec.encode(sources).repeat_interleave(g, dim=0)
        gens = [torch.Generator().manual_seed(int(seed) * 1009 + j) for seed in seeds for j in range(g)]
        x = initial_noise((n, *self.latent), 0, generators=gens) * self.path.noise_scale
        states, final = rollout(lambda y, sig: self._predict(self.model, y, sig, empty, cond, src), x, self.path.sigmas,
                                k, self.s.eta, gens)
        rewards = torch.from_numpy(score(to_uint8(self.codec.decode(final)), items))
        adv = group_advantages(rewards.view(-1, g)).flatten()
        # every stochastic step of every image in one batch: (k n, C, h, w)
        xs, xn = torch.cat(states[:-1]), torch.cat(states[1:])
        sigmas = self.path.sigmas
        sig, sig_next = sigmas[:k].repeat_interleave(n), sigmas[1:k + 1].repeat_interleave(n)
        empty_k, cond_k = TextStates.cat([empty] * k), TextStates.cat([cond] * k)
        src_k = None if src is None else src.repeat(k, 1, 1, 1)
        mean, std = self._transition(self.model, xs, sig, sig_next, empty_k, cond_k, src_k)
        loss = -adv.repeat(k) * gaussian_logp(xn, mean, std)
        logs = {"reward": rewards.mean()}
        if self.reference is not None:
            with torch.no_grad():
                ref, _ = self._transition(self.reference, xs, sig, sig_next, empty_k, cond_k, src_k)
            kl = ((mean - ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std.flatten() ** 2)
            loss = loss + self.s.kl * kl
            logs["kl"] = kl.mean().detach()
        return loss, logs

    def _transition(self, unet, x, sigma, sigma_next, empty, cond, source):
        return ddim_step(*self._predict(unet, x, sigma, empty, cond, source), sigma, sigma_next, self.s.eta)

    def forward(self, gen_items, gen_seed, edit_items, edit_source, edit_seed):
        losses, logs = [], {}
        for task, items, seeds, sources, score in (("t2i", gen_items, gen_seed, None, self.source.score_gen),
                                                   ("edit", edit_items, edit_seed, edit_source,
                                                    self.source.score_edit)):
            if len(items):
                loss, part = self._groups(list(items), seeds, sources, score)
                losses.append(loss)
                logs |= {f"{task}_{name}": v for name, v in part.items()}
        return torch.cat(losses).mean(), logs


# --------------------------------------------------------------------------------------------------- the verb
def check_rl(model, s: RLSettings, source) -> SamplerSettings:
    """Fail before training on a model or source that cannot be reward-tuned as asked (one line naming the field).
    Returns the training trajectories' sampler, checked: the model's defaults under the settings' guidance and
    shift, ``s.steps`` steps."""
    t = checked(model, default_settings(model).override(steps=s.steps, cfg=s.cfg, image_cfg=s.image_cfg,
                                                         flow_shift=s.flow_shift))
    _, edit_groups = s.counts()
    if edit_groups and not model.in_context:
        raise DreamliteError(f"edit_fraction: {model.name} cannot edit (a {type(model.unet).__name__} without "
                             "in-context width); set edit_fraction: 0")
    check_pair(model, None, edit_groups > 0)
    if model.prediction != "flow":  # the rollout sees a server on the flow path
        EpsilonToFlow.for_schedule(model.schedule, model.prediction)
    if edit_groups and "edit" not in source.tasks:
        raise DreamliteError("edit_fraction: the reward source has no edits; set edit_fraction: 0")
    return t


def reward_tune(model, s: RLSettings, folder, source, seed: int = 0, track=identity_track, log=print) -> dict:
    """Train the ``model`` Bundle in place (resuming from ``folder``'s checkpoint) to raise ``source``'s rewards of
    its own samples (GRPO). Its parameters end as the EMA (or raw) weights; its sampling defaults are unchanged.
    Returns fit's summary with the sampler's guidance and shift."""
    t = check_rl(model, s, source)
    reference = copy.deepcopy(model.unet) if s.kl else None
    latent = (model.unet.config.in_channels, model.latent_size(), model.latent_size())
    task = GRPOTask(model.unet, model.text, model.codec, model.image_size, latent, source,
                    trajectory(model, t), s, t.cfg, t.image_cfg, model.in_context, reference)
    gen_groups, edit_groups = s.counts()

    def batches(step: int) -> dict:
        return rl_batch(source, gen_groups, edit_groups, seed, step)

    task.model.train()
    summary = fit(task, batches, s.train, Path(folder), track, log, description="reward tuning")
    task.model.eval()
    return {**summary, "cfg": t.cfg, "image_cfg": t.image_cfg, "flow_shift": t.flow_shift}


def mean_rewards(model, source, prompts: list, edits: list, settings: SamplerSettings | None = None) -> dict:
    """``source``'s mean reward of ``model``'s images of ``prompts`` and ``edits`` (each task that has items),
    sampled with ``settings`` (default: the model's own, deterministic)."""
    s = settings or default_settings(model)
    out = {}
    if prompts:
        images = generate(model, [source.prompt_text(p) for p in prompts], s)
        out["t2i"] = float(source.score_gen(images, prompts).mean())
    if edits and model.in_context:
        sources = np.stack([source.source_image(e) for e in edits])
        out["edit"] = float(source.score_edit(edit(model, sources, [source.prompt_text(e) for e in edits], s),
                                              edits).mean())
    return out
