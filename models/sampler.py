"""The unified in-context sampler: one loop for generation and editing, for any denoiser.

A *denoiser* is any callable ``(x (N, C, h, w_in), t (N,), text: TextStates) -> model output (N, C, h, w_in)``:
a torch U-Net (``UNetDenoiser``) or an ONNX Runtime session (``OrtDenoiser``). In-context models (DreamLite) see
``cat([x_target, cond], width)`` with ``cond`` = zeros to generate and the source latent to edit; their output is
cropped to the target half. Guidance (DreamLite): generation ``u + g (c - u)`` (2 branches); editing
``u + g_t (text - image) + g_i (image - u)`` with u = (empty prompt, zero latent), image = (empty prompt, source),
text = (prompt, source). All branches go through the denoiser as one batch. Schedules are diffusers' schedulers:
DDIM, Euler, DDPM or DPM-Solver++ (2M SDE) for epsilon and v prediction, flow-matching Euler for flow models. The
stochastic samplers draw each image's noise from its own generator (seeded like its initial noise), so an image does
not depend on the batch it is sampled in.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal, get_args

import numpy as np
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler)

from dreamlite.io import DreamliteError
from dreamlite.precision import warn_if_bf16_slow

from .bundle import Bundle
from .codec import to_uint8
from .conditioning import unet_inputs
from .teacher import schedule_config
from .text import TextStates

Denoiser = Callable[[torch.Tensor, torch.Tensor, TextStates], torch.Tensor]
# Samplers for epsilon and v models; "ddpm" (ancestral) and "dpm-sde" (DPM-Solver++ 2M SDE) are stochastic.
Scheduler = Literal["ddim", "euler", "ddpm", "dpm-sde"]


@dataclass
class SamplerSettings:
    steps: int = 28
    cfg: float = 5.0  # text guidance (generation and editing)
    image_cfg: float = 1.5  # image guidance (editing)
    seed: int = 0
    scheduler: Scheduler = "ddim"  # for epsilon and v models; flow models always use flow-matching Euler
    batch: int = 16  # images per denoiser batch (before guidance branches)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast for torch denoisers
    clip: bool | None = None  # clip predicted clean latents to [-1, 1] (not Euler); None = when the codec is bounded
    flow_shift: float = 1.0  # flow models: sigma shift s' = k s / (1 + (k - 1) s); k > 1 puts more steps at high noise

    def check(self) -> "SamplerSettings":
        if self.steps < 1:
            raise DreamliteError(f"steps: must be at least 1 (got {self.steps})")
        if self.cfg < 0 or self.image_cfg < 0:
            raise DreamliteError("cfg: guidance scales must be >= 0")
        if self.flow_shift <= 0:
            raise DreamliteError(f"flow_shift: must be > 0 (got {self.flow_shift})")
        if self.scheduler not in get_args(Scheduler):
            raise DreamliteError(f"scheduler: {self.scheduler!r} is not one of {', '.join(get_args(Scheduler))}")
        return self

    def override(self, **values) -> "SamplerSettings":
        """A copy with each given value that is not None: a model's defaults under a recipe's or a user's choices."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})


# What a model's ``dreamlite.json`` may set (its ``sampler`` entry); seed, batch and clip are the caller's.
MODEL_DEFAULTS = ("steps", "cfg", "image_cfg", "scheduler", "precision", "flow_shift")


def default_settings(b: Bundle) -> SamplerSettings:
    """The model's own defaults (``dreamlite.json`` ``sampler`` entry) over the family's: epsilon servers 50 DDIM
    steps, guidance 5; flow models 28 Euler steps, guidance 3.5 (DreamLite's base model)."""
    base = SamplerSettings(steps=50, cfg=5.0) if b.prediction != "flow" else SamplerSettings(steps=28, cfg=3.5)
    return base.override(**{k: v for k, v in (b.meta.get("sampler") or {}).items() if k in MODEL_DEFAULTS})


class UNetDenoiser:
    """A diffusers U-Net as a denoiser; ``height`` x ``width`` is the target image size in pixels (time ids)."""

    def __init__(self, unet, height: int, width: int, precision: str = "fp32"):
        self.unet, self.height, self.width = unet, height, width
        self.config = dict(unet.config)
        self.dtype = next(unet.parameters()).dtype
        self.bf16 = precision == "bf16"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, text: TextStates) -> torch.Tensor:
        text = TextStates(text.states.to(self.dtype), text.pooled.to(self.dtype))
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.bf16):
            out = self.unet(x.to(self.dtype), t, **unet_inputs(self.config, text, self.height, self.width)).sample
        return out.float()


class OrtDenoiser:
    """An ONNX Runtime session of an exported U-Net (``dreamlite.compress.quantize.export``) as a denoiser.
    The graph's batch is static: calls are split into chunks of that batch, the last one padded."""

    def __init__(self, session):
        self.session = session
        self.names = [i.name for i in session.get_inputs()]
        self.batch = session.get_inputs()[0].shape[0]

    def feeds(self, x: torch.Tensor, t: torch.Tensor, text: TextStates):
        """The session feeds of one call: chunks of the graph's batch (the last padded), and each chunk's size."""
        inputs = {"sample": x, "timestep": t.float(), "encoder_hidden_states": text.states, "text_embeds": text.pooled}
        for k in range(0, x.shape[0], self.batch):
            feed = {}
            for name in self.names:
                part = inputs[name][k:k + self.batch].detach().float()
                pad = self.batch - part.shape[0]
                if pad:
                    part = torch.cat([part, part[-1:].expand(pad, *part.shape[1:])])
                feed[name] = part.numpy()
            yield feed, min(self.batch, x.shape[0] - k)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text: TextStates) -> torch.Tensor:
        return torch.cat([torch.from_numpy(self.session.run(None, feed)[0])[:n] for feed, n in self.feeds(x, t, text)])


def _scheduler_options(kind: str, clip: bool) -> dict:
    """diffusers config entries of one sampler kind: its clean-latent clipping, and DDIM's last step."""
    if kind == "ddim":
        # The last step lands on the clean estimate (alpha_bar = 1), not on t = 0's noise level: SDXL's pipelines
        # stop at alpha_bar[0] (noise std 0.029), invisible after a VAE but grain on a pixel codec.
        return {"set_alpha_to_one": True, "clip_sample": clip, "clip_sample_range": 1.0}
    if kind == "ddpm":
        return {"clip_sample": clip, "clip_sample_range": 1.0}
    if kind == "dpm-sde":  # dynamic thresholding at ratio 1 and maximum 1 is clipping to [-1, 1]
        return {"algorithm_type": "sde-dpmsolver++", "thresholding": clip, "dynamic_thresholding_ratio": 1.0,
                "sample_max_value": 1.0}
    return {}


SCHEDULER_CLASSES = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "ddpm": DDPMScheduler,
                     "dpm-sde": DPMSolverMultistepScheduler}


def make_scheduler(prediction: str, steps: int, kind: Scheduler = "ddim", clip: bool = False, schedule: str = "sdxl",
                   flow_shift: float = 1.0):
    """A diffusers scheduler with ``steps`` timesteps set: flow-matching Euler with sigmas linspace(1, 1/N, N)
    (the DreamLite mobile pipeline), shifted by ``flow_shift`` as diffusers shifts them (1: unchanged), for flow
    models; ``kind`` (DDIM, Euler, DDPM, DPM-Solver++ 2M SDE) on the model's training schedule (``sdxl``,
    ``linear`` or ``zero-snr``; trailing spacing, so the first step starts from pure noise) for epsilon and v models.
    ``clip``: the clean-latent estimate is clipped to [-1, 1], as pixel-space DDPM does (right only for codecs whose
    latents are bounded, like pixel-unshuffle; Euler has no clipping)."""
    if prediction == "flow":
        s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=flow_shift)
        s.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps).tolist())
        return s
    s = SCHEDULER_CLASSES[kind].from_config({**schedule_config(schedule, prediction), "timestep_spacing": "trailing",
                                             **_scheduler_options(kind, clip)})
    s.set_timesteps(steps)
    return s


def noise_generators(n: int, seed: int, first_index: int = 0) -> list[torch.Generator]:
    """One generator per image: image i's initial noise and every later draw come from ``seed + first_index + i``."""
    return [torch.Generator().manual_seed(seed + first_index + i) for i in range(n)]


def initial_noise(shape: tuple[int, ...], seed: int, first_index: int = 0,
                  generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """(B, C, h, w) noise where image i depends only on ``seed + first_index + i`` (not on the batch it is in);
    ``generators``: ``noise_generators(B, seed, first_index)`` to keep drawing from after this."""
    generators = generators or noise_generators(shape[0], seed, first_index)
    return torch.stack([torch.randn(shape[1:], generator=g) for g in generators])


def guide(outputs: list[torch.Tensor], cfg: float, image_cfg: float) -> torch.Tensor:
    """Combine branch outputs: [c] -> c; [u, c] -> u + g (c - u); [u, i, t] -> u + g_t (t - i) + g_i (i - u)."""
    if len(outputs) == 1:
        return outputs[0]
    if len(outputs) == 2:
        u, c = outputs
        return u + cfg * (c - u)
    u, i, t = outputs
    return u + cfg * (t - i) + image_cfg * (i - u)


@torch.no_grad()
def denoise(denoiser: Denoiser, prediction: str, noise: torch.Tensor, branches: list[tuple[TextStates, object]],
            s: SamplerSettings, schedule: str = "sdxl",
            generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Run the reverse process from ``noise`` (B, C, h, w); ``branches`` are (text, context) pairs with context a
    (B, C, h, w) latent placed beside the target, or None for a model without in-context width. ``schedule``: the
    training schedule of an epsilon model. ``generators``: one per image, for the noise of stochastic samplers
    (without them they draw from torch's global generator)."""
    sched = make_scheduler(prediction, s.steps, s.scheduler, bool(s.clip), schedule, s.flow_shift)
    x = noise * getattr(sched, "init_noise_sigma", 1.0)
    width = noise.shape[-1]
    text = TextStates.cat([t for t, _ in branches])
    # DDIM with clipping: re-derive epsilon from the clipped clean estimate, or the step mixes a clipped x0 with the
    # unclipped noise direction and drifts (measured on the shapes teacher: grey grain instead of black backgrounds).
    extra = {"use_clipped_model_output": True} if isinstance(sched, DDIMScheduler) and s.clip else {}
    for t in sched.timesteps:
        xin = sched.scale_model_input(x, t) if prediction != "flow" else x
        parts = [xin if ctx is None else torch.cat([xin, ctx], dim=-1) for _, ctx in branches]
        xs = torch.cat(parts)
        out = denoiser(xs, t.expand(xs.shape[0]).to(torch.float32), text)[..., :width]
        x = sched.step(guide(list(out.chunk(len(branches))), s.cfg, s.image_cfg), t, x, generator=generators,
                       **extra).prev_sample
    return x


def guidance_branches(s: SamplerSettings, editing: bool) -> int:
    """Denoiser inputs per image and step: 1 where guidance is off (scale 1: a guidance-distilled model),
    else 2 to generate and 3 to edit."""
    if editing:
        return 1 if s.cfg == 1 and s.image_cfg == 1 else 3
    return 1 if s.cfg == 1 else 2


def _branches(b: Bundle, prompts: list[str], source: torch.Tensor | None, s: SamplerSettings):
    """Guidance branches of one batch: generation [uncond?, cond]; editing [uncond, image, text] or [text]."""
    cond = b.text.encode(prompts)
    n = len(prompts)
    if guidance_branches(s, source is not None) == 1:
        ctx = torch.zeros_like(_latent_like(b, n)) if b.in_context and source is None else source
        return [(cond, ctx)]
    empty = b.text.encode([""] * n)
    if source is None:
        ctx = torch.zeros_like(_latent_like(b, n)) if b.in_context else None
        return [(empty, ctx), (cond, ctx)]
    return [(empty, torch.zeros_like(source)), (empty, source), (cond, source)]


def _latent_like(b: Bundle, n: int, size: int | None = None) -> torch.Tensor:
    h = b.latent_size(size)
    return torch.empty(n, b.unet.config.in_channels, h, h)


def checked(b: Bundle, s: SamplerSettings) -> SamplerSettings:
    """``s`` checked against the model (one line naming the field at fault), with ``clip`` resolved from its codec."""
    if b.text is None or b.codec is None:
        raise DreamliteError(f"{b.name}: sampling needs a text encoder and a codec beside the U-Net "
                             "(a preset without them can only be inspected)")
    s.check()
    if b.unet is not None:
        warn_if_bf16_slow(s.precision, next(b.unet.parameters()).device.type, "precision")
    if s.flow_shift != 1 and b.prediction != "flow":
        raise DreamliteError(f"flow_shift: applies to flow-matching models; {b.name} predicts {b.prediction}")
    return replace(s, clip=getattr(b.codec, "bounded", False) if s.clip is None else s.clip)


@torch.no_grad()
def generate(b: Bundle, prompts: list[str], s: SamplerSettings = SamplerSettings(), size: int | None = None,
             denoiser: Denoiser | None = None, first_index: int = 0) -> np.ndarray:
    """Text-to-image: uint8 (B, H, W, 3); image i uses seed ``s.seed + first_index + i``."""
    s = checked(b, s)
    size = size or b.image_size
    if b.denoiser is not None and size != b.image_size:
        raise DreamliteError(f"{b.name}: the artifact was exported for {b.image_size} px images, not {size}")
    denoiser = denoiser or b.denoiser or UNetDenoiser(b.unet, size, size, s.precision)
    out = []
    for k in range(0, len(prompts), s.batch):
        chunk = prompts[k:k + s.batch]
        gens = noise_generators(len(chunk), s.seed, first_index + k)
        noise = initial_noise(tuple(_latent_like(b, len(chunk), size).shape), s.seed, generators=gens)
        latents = denoise(denoiser, b.prediction, noise, _branches(b, chunk, None, s), s, b.schedule, gens)
        out.append(to_uint8(b.codec.decode(latents)))
    return np.concatenate(out)


@torch.no_grad()
def edit(b: Bundle, sources: np.ndarray, prompts: list[str], s: SamplerSettings = SamplerSettings(),
         denoiser: Denoiser | None = None, first_index: int = 0) -> np.ndarray:
    """Instruction editing of uint8 images (B, H, W, 3) of the model's size -> uint8 (B, H, W, 3)."""
    s = checked(b, s)
    if not b.in_context:
        raise DreamliteError(f"{b.name}: editing needs an in-context model (DreamLite layout); this one is "
                             f"{type(b.unet).__name__} without in-context width")
    if sources.shape[1:3] != (b.image_size, b.image_size):
        raise DreamliteError(f"image: {sources.shape[2]}x{sources.shape[1]} px, the model edits "
                             f"{b.image_size}x{b.image_size} images (resize it first, or pass --resize to dreamlite edit)")
    denoiser = denoiser or b.denoiser or UNetDenoiser(b.unet, b.image_size, b.image_size, s.precision)
    out = []
    for k in range(0, len(prompts), s.batch):
        chunk = prompts[k:k + s.batch]
        src = torch.from_numpy(np.array(sources[k:k + s.batch])).permute(0, 3, 1, 2).float() / 127.5 - 1
        src_latent = b.codec.encode(src)
        gens = noise_generators(len(chunk), s.seed, first_index + k)
        noise = initial_noise(tuple(src_latent.shape), s.seed, generators=gens)
        latents = denoise(denoiser, b.prediction, noise, _branches(b, chunk, src_latent, s), s, b.schedule, gens)
        out.append(to_uint8(b.codec.decode(latents)))
    return np.concatenate(out)
