import numpy as np
import pytest
import torch

from dreamlite.io import DreamliteError
from dreamlite.models.sampler import (SamplerSettings, UNetDenoiser, denoise, edit, generate, guide, initial_noise,
                                     make_scheduler)

PROMPTS = ["a red circle", "two squares"]


def test_guidance_maths():
    u, c, i = torch.tensor(1.0), torch.tensor(3.0), torch.tensor(2.0)
    assert guide([c], 7, 7) == c
    assert guide([u, c], 1.0, 0) == c and guide([u, c], 2.0, 0) == 5.0  # u + g (c - u)
    assert guide([u, i, c], 2.0, 1.5) == 1 + 2 * (3 - 2) + 1.5 * (2 - 1)  # DreamLite's 3 branches


@pytest.mark.parametrize("which", ["tiny_server", "tiny_mobile"])
def test_same_seed_same_images_other_seed_other_images(which, request):
    b = request.getfixturevalue(which)
    s = SamplerSettings(steps=3, cfg=3.0, seed=5)
    a, again = generate(b, PROMPTS, s), generate(b, PROMPTS, s)
    assert a.shape == (2, 64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, again)
    assert not np.array_equal(a, generate(b, PROMPTS, SamplerSettings(steps=3, cfg=3.0, seed=6)))


@pytest.mark.parametrize("which", ["tiny_server", "tiny_mobile"])
@torch.no_grad()
def test_guidance_scale_one_equals_the_conditional_only_path(which, request):
    b = request.getfixturevalue(which)
    s = SamplerSettings(steps=3, cfg=1.0)
    noise = initial_noise((2, 48, 16, 16), 0)
    cond, empty = b.text.encode(PROMPTS), b.text.encode(["", ""])
    ctx = torch.zeros_like(noise) if b.in_context else None
    den = UNetDenoiser(b.unet, 64, 64)
    both = denoise(den, b.prediction, noise, [(empty, ctx), (cond, ctx)], s)
    only = denoise(den, b.prediction, noise, [(cond, ctx)], s)
    assert torch.allclose(both, only, atol=1e-4)


def test_flow_shift_moves_the_sampling_sigmas_towards_noise(tiny_mobile):
    plain, shifted = make_scheduler("flow", 4).sigmas, make_scheduler("flow", 4, flow_shift=3.0).sigmas
    assert torch.allclose(plain, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))  # linspace(1, 1/N, N), then 0
    assert torch.allclose(shifted, 3 * plain / (1 + 2 * plain))  # 1 and 0 stay; every step between moves up
    assert shifted[0] == 1 and (shifted[1:-1] > plain[1:-1]).all()
    a = generate(tiny_mobile, PROMPTS, SamplerSettings(steps=3, cfg=2.0))
    assert not np.array_equal(a, generate(tiny_mobile, PROMPTS, SamplerSettings(steps=3, cfg=2.0, flow_shift=3.0)))
    with pytest.raises(DreamliteError, match="flow_shift: must be > 0"):
        SamplerSettings(flow_shift=0).check()


@pytest.mark.parametrize("scheduler", ["ddpm", "dpm-sde"])
def test_stochastic_samplers_are_seeded_per_image(scheduler, tiny_server):
    """The noise a stochastic sampler adds comes from each image's own generator: the same seed gives the same
    images, and an image does not depend on the batch it is sampled in."""
    s = SamplerSettings(steps=4, cfg=3.0, seed=5, scheduler=scheduler)
    both = generate(tiny_server, PROMPTS, s)
    assert np.array_equal(both, generate(tiny_server, PROMPTS, s))
    one_by_one = generate(tiny_server, PROMPTS, SamplerSettings(steps=4, cfg=3.0, seed=5, scheduler=scheduler, batch=1))
    assert np.abs(both.astype(int) - one_by_one).max() <= 1  # the batch changes only float rounding
    assert not np.array_equal(both, generate(tiny_server, PROMPTS, SamplerSettings(steps=4, cfg=3.0, seed=5)))  # DDIM


@pytest.mark.parametrize("kind", ["ddim", "ddpm", "dpm-sde"])
def test_clipping_bounds_the_clean_estimate_of_every_clipping_sampler(kind):
    """A denoiser whose clean estimate is far outside [-1, 1] ends inside it when the sampler clips, not otherwise."""
    from dreamlite.models.text import TextStates

    text = TextStates(torch.zeros(1, 2, 4), torch.zeros(1, 4))
    noise = initial_noise((1, 48, 16, 16), 0)
    gens = lambda: [torch.Generator().manual_seed(1)]  # noqa: E731

    def run(clip):
        s = SamplerSettings(steps=10, cfg=1, scheduler=kind, clip=clip)  # the last step lands on t = 0
        return denoise(lambda x, t, c: -3 * torch.ones_like(x), "epsilon", noise, [(text, None)], s, generators=gens())
    assert run(True).abs().max() <= 1 + 1e-4 and run(False).abs().max() > 2


class Recorder:
    def __init__(self, inner):
        self.inner, self.widths, self.batches = inner, set(), []

    def __call__(self, x, t, text):
        self.widths.add(x.shape[-1])
        self.batches.append(x.shape[0])
        return self.inner(x, t, text)


def test_edit_runs_three_branches_on_double_width_and_crops_the_target(tiny_mobile):
    b = tiny_mobile
    sources = generate(b, PROMPTS, SamplerSettings(steps=2))
    rec = Recorder(UNetDenoiser(b.unet, 64, 64))
    out = edit(b, sources, ["make the circle blue", "remove the square"], SamplerSettings(steps=2), denoiser=rec)
    assert out.shape == sources.shape
    assert rec.widths == {32} and set(rec.batches) == {6}  # (target | source), 3 branches x 2 images


def test_generation_on_an_in_context_model_puts_a_blank_beside_the_target(tiny_mobile):
    rec = Recorder(UNetDenoiser(tiny_mobile.unet, 64, 64))
    generate(tiny_mobile, PROMPTS, SamplerSettings(steps=2, cfg=2.0), denoiser=rec)
    assert rec.widths == {32} and set(rec.batches) == {4}


def test_bad_edit_inputs(tiny_server, tiny_mobile):
    img = np.zeros((1, 64, 64, 3), np.uint8)
    with pytest.raises(DreamliteError, match="in-context"):
        edit(tiny_server, img, ["remove the circle"])
    with pytest.raises(DreamliteError, match="64x64"):
        edit(tiny_mobile, np.zeros((1, 48, 48, 3), np.uint8), ["remove the circle"])
    with pytest.raises(DreamliteError, match="vocabulary"):
        generate(tiny_mobile, ["a purple giraffe"])


@pytest.mark.parametrize("which", ["tiny_server", "tiny_mobile"])
def test_onnx_runtime_export_samples_the_same_images(which, request, tmp_path):
    import onnxruntime as ort
    from dreamlite.compress.quantize.export import export_onnx
    from dreamlite.models.sampler import OrtDenoiser

    b = request.getfixturevalue(which)
    w = 32 if b.in_context else 16
    path = export_onnx(b.unet, tmp_path / "unet.onnx", 4, (16, w), (64, 64), b.text.config.max_tokens)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    s = SamplerSettings(steps=3, cfg=2.5)
    noise = initial_noise((3, 48, 16, 16), 0)
    cond, empty = b.text.encode(PROMPTS + ["a star"]), b.text.encode([""] * 3)
    ctx = torch.zeros_like(noise) if b.in_context else None
    branches = [(empty, ctx), (cond, ctx)]
    torch_latents = denoise(UNetDenoiser(b.unet, 64, 64), b.prediction, noise, branches, s)
    ort_latents = denoise(OrtDenoiser(session), b.prediction, noise, branches, s)  # 6 rows through batch-4 graph
    assert torch.allclose(torch_latents, ort_latents, atol=1e-3)


@pytest.mark.parametrize("schedule,prediction", [("sdxl", "epsilon"), ("linear", "epsilon"), ("sdxl", "v"),
                                                 ("zero-snr", "v")])
def test_ddim_with_the_true_noise_returns_the_clean_latent(schedule, prediction):
    """An oracle denoiser (the exact noise, or v, of a known clean latent) must lead DDIM to that latent, with no
    noise left from the last step."""
    from diffusers import DDPMScheduler
    from dreamlite.models.teacher import SCHEDULES
    from dreamlite.models.text import TextStates

    x0 = torch.rand(1, 48, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ac = DDPMScheduler.from_config(SCHEDULES[schedule]).alphas_cumprod

    def oracle(x, t, text):
        a = ac[t.long()].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0

    text = TextStates(torch.zeros(1, 2, 4), torch.zeros(1, 4))
    out = denoise(oracle, prediction, torch.randn_like(x0), [(text, None)], SamplerSettings(steps=10, cfg=1), schedule)
    assert (out - x0).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["ddim", "euler", "ddpm", "dpm-sde"])
def test_every_sampler_starts_from_pure_noise_on_the_zero_snr_schedule(kind):
    """On the zero-snr schedule t = 999 is pure noise (alpha_bar 0): a v model's oracle (v = -x0 there) leads every
    sampler to its clean latent, with nothing infinite on the way (Euler and DPM-Solver replace the 0 by 2^-24)."""
    from diffusers import DDPMScheduler
    from dreamlite.models.teacher import SCHEDULES
    from dreamlite.models.text import TextStates

    ac = DDPMScheduler.from_config(SCHEDULES["zero-snr"]).alphas_cumprod
    assert ac[-1] == 0 and ac[-2] > 0
    x0 = torch.rand(1, 48, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def oracle(x, t, text):
        a = ac[t.long()].view(-1, 1, 1, 1)
        return a.sqrt() * (x - a.sqrt() * x0) / (1 - a).sqrt() - (1 - a).sqrt() * x0

    text = TextStates(torch.zeros(1, 2, 4), torch.zeros(1, 4))
    s = SamplerSettings(steps=10, cfg=1, scheduler=kind)
    out = denoise(oracle, "v", initial_noise((1, 48, 16, 16), 0), [(text, None)], s, "zero-snr",
                  generators=[torch.Generator().manual_seed(1)])
    assert torch.isfinite(out).all() and (out - x0).abs().max() < 1e-2
