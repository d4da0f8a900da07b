"""Flow-matching maths (rectified flow, as DreamLite and SD3) and the epsilon -> flow conversion used to distil a
discrete-schedule epsilon teacher (SDXL layout) into a flow student. Pure functions on tensors; no model.

Flow: ``x_s = (1 - s) x0 + s eps`` for a sigma ``s`` in [0, 1]; the model predicts the velocity ``v = eps - x0``
(diffusers' ``FlowMatchEulerDiscreteScheduler`` convention: it is called at timestep ``1000 s`` and steps
``x <- x + (s_next - s) v``).

Epsilon or v teacher on a discrete schedule ``alpha_bar[t]``: ``x_t = sqrt(a) x0 + sqrt(1 - a) eps``. A flow sample
at ``s`` is the teacher's sample at the timestep of equal signal-to-noise ratio, ``a / (1 - a) = ((1 - s) / s)^2``,
scaled by ``1 / sqrt((1 - s)^2 + s^2)``; the teacher's epsilon then gives ``v = (eps - x_s) / (1 - s)``, its v
(``sqrt(a) eps - sqrt(1 - a) x0``) gives ``eps - x0`` directly, finite up to ``s = 1`` on a zero-terminal-SNR
schedule. Sigmas noisier than the teacher's last timestep (``s > s_max``, 0.936 on SDXL's schedule, 1 at zero
terminal SNR) are outside what it was trained on: ``in_range`` says where its prediction may be used.
"""
from __future__ import annotations

from typing import Literal

import torch

from dreamlite.io import DreamliteError

SigmaSampling = Literal["uniform", "logit-normal"]


def sample_sigmas(n: int, generator: torch.Generator, kind: SigmaSampling = "logit-normal", shift: float = 1.0,
                  mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """(n,) training sigmas in (0, 1): uniform or logit-normal (SD3, Esser et al. 2024), then the resolution shift
    ``shift s / (1 + (shift - 1) s)`` (shift > 1 spends more steps at high noise)."""
    if kind == "uniform":
        s = torch.rand(n, generator=generator)
    else:
        s = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    return shift_sigmas(s.clamp(1e-4, 1 - 1e-4), shift)


def shift_sigmas(s: torch.Tensor, shift: float) -> torch.Tensor:
    """The resolution shift ``shift s / (1 + (shift - 1) s)`` (SD3): keeps 0 and 1, moves the rest toward 1 for
    ``shift`` > 1; the signal-to-noise ratio ``((1 - s) / s)^2`` is divided by ``shift^2``."""
    return shift * s / (1 + (shift - 1) * s)


def _b(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) for broadcasting against a (B, C, H, W) latent."""
    return s.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def flow_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_s = (1 - s) x0 + s eps``."""
    s = _b(sigma, x0)
    return (1 - s) * x0 + s * noise


def flow_velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching target ``v = eps - x0``."""
    return noise - x0


def flow_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The timestep a flow model is called with (diffusers: ``1000 s``)."""
    return sigma * 1000.0


class EpsilonToFlow:
    """Map flow sigmas to an epsilon or v teacher's (continuous) timesteps and its output to the flow velocity.

    ``alphas_cumprod``: (T,) the teacher's discrete schedule, decreasing in t (its last entry may be 0: zero terminal
    SNR, Lin et al. 2023).
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        a = alphas_cumprod.double()
        self.log_snr = torch.log(a / (1 - a))  # decreasing in t; -inf at zero terminal SNR
        self.sigma_min = float(self.sigma_of(self.log_snr[0]))
        self.sigma_max = float(self.sigma_of(self.log_snr[-1]))

    @classmethod
    def for_schedule(cls, schedule: str = "sdxl", prediction: str = "epsilon") -> "EpsilonToFlow":
        from diffusers import DDPMScheduler

        from dreamlite.models.teacher import SCHEDULES
        alphas_cumprod = DDPMScheduler.from_config(SCHEDULES[schedule]).alphas_cumprod
        if alphas_cumprod[-1] == 0 and prediction == "epsilon":
            raise DreamliteError(f"schedule {schedule}: an epsilon model on it cannot be seen as a flow velocity "
                                 "(at zero SNR its noise estimate says nothing of the image); train it with "
                                 "prediction: v")
        return cls(alphas_cumprod)

    @staticmethod
    def sigma_of(log_snr: torch.Tensor) -> torch.Tensor:
        """The flow sigma of a log-SNR: ``(1 - s) / s = exp(log_snr / 2)``."""
        return 1 / (1 + torch.exp(log_snr / 2))

    def in_range(self, sigma: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the sigma's noise level is within the teacher's schedule (up to its last timestep)."""
        return sigma <= self.sigma_max + 1e-6

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """(B,) float timesteps of equal SNR, interpolated linearly in log-SNR (in sigma on a last segment that
        ends at zero SNR), clamped to [0, T - 1]."""
        s = sigma.double()
        lam = 2 * torch.log((1 - s) / s)
        table = self.log_snr.flip(0)  # increasing
        lam = lam.clamp(table[0], table[-1])
        idx = torch.searchsorted(table, lam).clamp(1, len(table) - 1)
        lo, hi = table[idx - 1], table[idx]
        frac = (lam - lo) / (hi - lo)
        s_lo, s_hi = self.sigma_of(lo), self.sigma_of(hi)
        frac = torch.where(torch.isinf(lo), (s.clamp(s_hi, s_lo) - s_lo) / (s_hi - s_lo), frac)
        t_increasing = (idx - 1) + frac  # position in the flipped table
        return ((len(table) - 1) - t_increasing).float()

    @staticmethod
    def teacher_input(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The flow sample rescaled to the teacher's ``sqrt(a) x0 + sqrt(1 - a) eps`` at equal SNR."""
        s = _b(sigma, x)
        return x / torch.sqrt((1 - s) ** 2 + s ** 2)

    @staticmethod
    def alpha_bar(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The teacher's alpha_bar at the flow sigma's SNR, broadcast against ``x``: SNR = ((1 - s) / s)^2."""
        s = _b(sigma, x)
        return (1 - s) ** 2 / ((1 - s) ** 2 + s ** 2)

    @staticmethod
    def velocity(output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor,
                 prediction: str = "epsilon") -> torch.Tensor:
        """The flow velocity ``eps - x0`` that the teacher's ``output`` (its epsilon or v, at ``teacher_input(x)``)
        stands for, at the flow sample ``x`` (not the rescaled one). With ``r = sqrt((1 - s)^2 + s^2)``, v gives
        ``eps - x0 = v / r + (2 s - 1) x / r^2``, finite at ``s = 1``; epsilon's ``(eps - x) / (1 - s)`` is not."""
        s = _b(sigma, x)
        if prediction == "epsilon":
            return (output - x) / (1 - s)
        r2 = (1 - s) ** 2 + s ** 2
        return output / r2.sqrt() + (2 * s - 1) * x / r2
