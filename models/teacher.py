"""Training a server U-Net from scratch with SDXL's objective: epsilon prediction on a discrete 1000-step schedule,
MSE (optionally Min-SNR-gamma weighted, Hang et al. 2023), caption dropout for guidance.

The schedule is a property of the model (``schedule`` in its dreamlite.json; the sampler and distillation read it):
SDXL's scaled-linear one by default, or DDPM's linear one. Linear was tried for the pixel-space shapes teacher
(scaled-linear ends at alpha_bar 0.0047, so flat-coloured scenes leave their layout readable at t = 999) and failed
with few-step DDIM: at alpha_bar_T = 4e-5 the clean estimate x0 = (x - sqrt(1 - a) eps) / sqrt(a) multiplies the
model's epsilon error by 156 at the first step (14.6 on scaled-linear), and samples stayed noise after 3,500 steps.
Offset noise is what the shapes teacher uses against the leak.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from dreamlite.evaluation.shapes import render
from dreamlite.evaluation.shapes.world import sample_t2i

from .codec import Codec
from .conditioning import unet_inputs
from .text import BindingHead

# SDXL's training schedule (scheduler_config.json of stable-diffusion-xl-base-1.0).
SDXL_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
                 "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}
# DDPM's pixel-space schedule (Ho et al. 2020), otherwise the same.
LINEAR_SCHEDULE = {**SDXL_SCHEDULE, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
# SDXL's with zero terminal SNR (Lin et al. 2023, diffusers' rescale_betas_zero_snr): t = 999 is pure noise, as
# sampling starts. On SDXL's own schedule a training input at t = 999 still holds sqrt(0.0047) of the image, and on
# the 48 correlated channels of the pixel-unshuffle latent that is enough to place the objects: a model learns to
# read the layout from its input there and, from pure noise, reads it from the noise instead of the text
# (docs/models.md). Needs v-prediction (epsilon says nothing about the image at SNR 0).
ZERO_SNR_SCHEDULE = {**SDXL_SCHEDULE, "rescale_betas_zero_snr": True}
SCHEDULES = {"sdxl": SDXL_SCHEDULE, "linear": LINEAR_SCHEDULE, "zero-snr": ZERO_SNR_SCHEDULE}
Schedule = Literal["sdxl", "linear", "zero-snr"]


def schedule_config(schedule: str, prediction: str) -> dict:
    """The diffusers scheduler config of an epsilon or v model's training schedule (``prediction_type`` set)."""
    return {**SCHEDULES[schedule], "prediction_type": {"epsilon": "epsilon", "v": "v_prediction"}[prediction]}


def step_generator(seed: int, step: int, stream: int = 0) -> tuple[np.random.Generator, torch.Generator]:
    """The numpy and torch generators of one training step: a pure function of (seed, step, stream)."""
    rng = np.random.default_rng([seed, step, stream])
    return rng, torch.Generator().manual_seed(int(rng.integers(2 ** 62)))


def t2i_batch(seed: int, step: int, batch: int, latent_shape: tuple[int, int, int], caption_dropout: float = 0.1,
              size: int = 64, timesteps: int = 1000, tag_weights: tuple[float, ...] | None = None,
              color_captions: float = 0.0) -> dict:
    """The global text-to-image batch of ``step``: images (B, 3, H, W) in [-1, 1], captions ('' when dropped),
    noise (B, C, h, w), integer timesteps (B,) and a per-image colour offset (B, 3, 1, 1) for offset noise.
    ``tag_weights`` and ``color_captions`` set the caption mix (``sample_t2i``)."""
    rng, gen = step_generator(seed, step)
    images, captions = [], []
    for _ in range(batch):
        scene, caption = sample_t2i(rng, tag_weights, color_captions)
        images.append(render(scene, size))
        captions.append("" if rng.random() < caption_dropout else caption)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return {"images": x, "captions": captions, "noise": torch.randn((batch, *latent_shape), generator=gen),
            "timesteps": torch.randint(0, timesteps, (batch,), generator=gen),
            "offset": torch.randn((batch, 3, 1, 1), generator=gen)}


def offset_noise(noise: torch.Tensor, offset: torch.Tensor, strength: float, codec: Codec,
                 size: tuple[int, int]) -> torch.Tensor:
    """Offset noise (Guttenberg 2023, used for SDXL): add ``strength`` x a per-image constant colour, taken through
    the codec, so the model learns to move an image's mean colour: without it the scaled-linear schedule's non-zero
    terminal SNR leaks the mean colour into training inputs and sampling from pure noise stays grey."""
    if not strength:
        return noise
    return noise + strength * codec.encode(offset.expand(-1, -1, *size))


def snr_weight(snr: torch.Tensor, gamma: float | None = 5.0, floor: float | None = None,
               prediction: str = "epsilon") -> torch.Tensor:
    """The epsilon-MSE weight that makes the loss an x0-MSE weighted by ``clamp(snr, floor, gamma)``: Min-SNR-gamma
    (Hang et al. 2023) caps the low-noise end; ``floor`` lifts the high-noise end, where epsilon-MSE weighs an x0
    error by only ``snr`` (0.005 at SDXL's t = 999) and so hardly trains the layout (``floor`` 1 is the truncated-SNR
    weighting of Salimans & Ho 2022). Neither: plain epsilon-MSE (weight 1). For ``prediction="v"`` the weight is
    of a v-MSE, which weighs x0 errors by ``snr + 1``."""
    if gamma is None and floor is None:
        return torch.ones_like(snr)
    return snr.clamp(min=floor, max=gamma) / (snr + 1 if prediction == "v" else snr)


def target_of(schedule: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              prediction: str) -> torch.Tensor:
    """What a discrete-schedule U-Net regresses at ``add_noise(x0, noise, timesteps)``: the noise for an epsilon
    model, ``v = sqrt(a) eps - sqrt(1 - a) x0`` for a v model."""
    return schedule.get_velocity(x0, noise, timesteps) if prediction == "v" else noise


def epsilon_of(output: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """The epsilon a discrete-schedule U-Net's ``output`` at the noisy ``x`` stands for: itself for an epsilon model,
    ``sqrt(a) v + sqrt(1 - a) x`` for a v model. ``alpha_bar`` broadcasts against ``x``."""
    if prediction == "epsilon":
        return output
    return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * x


def clean_of(eps: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The clean estimate ``(x - sqrt(1 - a) eps) / sqrt(a)`` that ``eps`` at the noisy ``x`` stands for (DDIM's
    x0; at t = 999 on SDXL's schedule it multiplies the epsilon error by 14.6)."""
    return (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


class EpsilonTask(nn.Module):
    """``forward(images, captions, noise, timesteps) -> (loss, logs)`` for an epsilon-prediction U-Net, or with
    ``prediction="v"`` a v-prediction one (target ``sqrt(a) eps - sqrt(1 - a) x0``, Salimans & Ho 2022: at high
    noise its output is the clean image, not noise to copy)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, codec: Codec, snr_gamma: float | None = 5.0,
                 noise_offset: float = 0.0, schedule: Schedule = "sdxl", snr_floor: float | None = None,
                 binding_weight: float = 0.0, prediction: str = "epsilon"):
        super().__init__()
        self.unet, self.text_encoder, self.codec = unet, text_encoder, codec
        # the text-side objective (``BindingHead``) is added to the loss with this weight and logged as "binding"
        self.binding_weight = binding_weight
        self.binding = BindingHead(text_encoder.width) if binding_weight else None
        self.schedule = DDPMScheduler.from_config(SCHEDULES[schedule])
        self.snr_gamma, self.snr_floor, self.noise_offset = snr_gamma, snr_floor, noise_offset
        self.prediction = prediction

    def forward(self, images, captions, noise, timesteps, offset=None):
        latents = self.codec.encode(images)
        if offset is not None:
            noise = offset_noise(noise, offset, self.noise_offset, self.codec, images.shape[-2:])
        noisy = self.schedule.add_noise(latents, noise, timesteps)
        text = self.text_encoder.encode(captions)
        h, w = images.shape[-2:]
        pred = self.unet(noisy, timesteps, **unet_inputs(self.unet.config, text, h, w)).sample
        target = target_of(self.schedule, latents, noise, timesteps, self.prediction)
        per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        snr = compute_snr(self.schedule, timesteps)
        per_sample = per_sample * snr_weight(snr, self.snr_gamma, self.snr_floor, self.prediction)
        if self.binding is None:
            return per_sample.mean(), {}
        binding = self.binding(text.states, captions)
        return per_sample.mean() + self.binding_weight * binding, {"binding": binding.detach()}
