import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from dreamlite.compress.distill.recover import CachedText, guided_flow
from dreamlite.compress.distill.rl import (RLSettings, ddim_step, estimates, gaussian_logp, group_advantages,
                                           mean_rewards, reward_tune, rl_batch, rollout, trajectory)
from dreamlite.compress.distill.steps import flow_sigmas
from dreamlite.evaluation.rewards import ShapesRewards
from dreamlite.io import DreamliteError
from dreamlite.models.sampler import SamplerSettings, UNetDenoiser, _branches, denoise, initial_noise
from dreamlite.train import TrainSettings

from conftest import killed_then_resumed, tiny_bundle

LATENT = (48, 16, 16)


def _settings(train_steps=2, batch=8, group=4, lr=5e-3, **kw) -> RLSettings:
    train = TrainSettings(steps=train_steps, batch=batch, lr=lr, warmup=0, ema=0, log_every=1, checkpoint_every=1)
    return RLSettings(steps=kw.pop("steps", 6), sde_steps=kw.pop("sde_steps", 2), group=group, train=train, **kw)


class Brightness(ShapesRewards):
    """The shapes world's prompts and edits, rewarded by how bright (``sign`` 1) or dark (-1) the image is."""

    def __init__(self, sign: float = 1.0):
        super().__init__(64)
        self.sign = sign

    def score_gen(self, images, items):
        return self.sign * images.astype(np.float32).mean(axis=(1, 2, 3)) / 255

    score_edit = score_gen


def _model():
    m = tiny_bundle("shapes-mobile")
    m.meta["sampler"] = {"steps": 6, "cfg": 2.0, "flow_shift": 3.0}
    return m


def test_ddim_step_is_euler_without_noise_and_the_forward_posterior_with_eta_1():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    s, t = torch.tensor([1.0, 0.7, 0.4]), torch.tensor([0.8, 0.5, 0.1])
    x = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
    mean, std = ddim_step(x0, eps, s, t, eta=0.0)
    v = eps - x0
    assert torch.allclose(mean, x + (t - s).view(-1, 1, 1, 1) * v, atol=1e-6) and torch.all(std == 0)
    # q(x_t | x_s, x0) by Gaussian conditioning: prior N((1 - t) x0, t^2), x_s = r x_t + tau noise
    r = (1 - s) / (1 - t)
    tau2 = s ** 2 - r ** 2 * t ** 2
    var = 1 / (1 / t ** 2 + r ** 2 / tau2)
    b = lambda a: a.view(-1, 1, 1, 1)  # noqa: E731
    want = b(var) * (b(1 - t) * x0 / b(t ** 2) + b(r) * x / b(tau2))
    mean, std = ddim_step(x0, eps, s, t, eta=1.0)
    assert torch.allclose(mean, want, atol=1e-5) and torch.allclose(std.flatten() ** 2, var, atol=1e-6)


def test_log_probability_and_group_advantages():
    x, mean, std = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    want = torch.distributions.Normal(mean, std).log_prob(x).mean(dim=(1, 2, 3))
    assert torch.allclose(gaussian_logp(x, mean, std), want, atol=1e-5)
    adv = group_advantages(torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5]]))
    assert torch.allclose(adv[0], torch.tensor([-1.0, 1.0, 1.0, -1.0]), atol=1e-3) and torch.all(adv[1] == 0)


@pytest.mark.parametrize("editing", [False, True])
def test_a_rollout_without_stochastic_steps_is_the_samplers_own_guided_run(editing):
    m = _model()
    settings = SamplerSettings(steps=6, cfg=2.0, image_cfg=1.5, flow_shift=3.0)
    noise = initial_noise((2, *LATENT), 3)
    prompts = ["a red circle", "two stars"]
    source = torch.rand(2, *LATENT) * 2 - 1 if editing else None
    ref = denoise(UNetDenoiser(m.unet, 64, 64), "flow", noise, _branches(m, prompts, source, settings), settings)
    text = CachedText(m.text)
    empty, cond = text.encode([""] * 2), text.encode(prompts)

    def predict(x, s):
        return estimates(guided_flow(m.unet, x, s, empty, cond, source, 2.0, 1.5, 64), x, s, False)

    states, final = rollout(predict, noise, flow_sigmas(6, 3.0), 0, 1.0, [])
    assert len(states) == 1 and torch.allclose(final, ref, atol=1e-5)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    states, noisy = rollout(predict, noise, flow_sigmas(6, 3.0), 2, 1.0, gens)
    assert len(states) == 3 and not torch.allclose(noisy, ref, atol=1e-2)  # the first two steps drew noise


def test_an_epsilon_models_rollout_without_stochastic_steps_is_its_clipped_ddim_run():
    """A server (epsilon, discrete schedule) is trained on its DDIM path seen on the flow path: started at its last
    timestep's sigma from the same noise, with clipped estimates, it lands where the sampler's clipped DDIM does."""
    m = tiny_bundle("shapes-server")
    settings = SamplerSettings(steps=5, cfg=3.0, scheduler="ddim", clip=True)
    noise = initial_noise((2, *LATENT), 4)
    prompts = ["a red circle left of a blue square", "three stars"]
    ref = denoise(UNetDenoiser(m.unet, 64, 64), "epsilon", noise, _branches(m, prompts, None, settings), settings)
    path = trajectory(m, settings)
    assert path.clip and 0.9 < path.sigmas[0] < 1 and path.sigmas[-1] == 0 and len(path.sigmas) == 6
    text = CachedText(m.text)
    empty, cond = text.encode([""] * 2), text.encode(prompts)

    def predict(x, s):
        v = guided_flow(m.unet, x, s, empty, cond, None, 3.0, 1.0, 64, False, path.convert, "epsilon")
        return estimates(v, x, s, path.clip)

    _, final = rollout(predict, noise * path.noise_scale, path.sigmas, 0, 1.0, [])
    assert torch.allclose(final, ref, atol=1e-4) and ref.abs().max() <= 1


def test_batches_are_pure_functions_of_seed_and_step():
    a, b = (rl_batch(ShapesRewards(), 2, 1, 0, 5) for _ in range(2))
    assert [p.prompt for p in a["gen_items"]] == [p.prompt for p in b["gen_items"]]
    assert torch.equal(a["gen_seed"], b["gen_seed"]) and torch.equal(a["edit_source"], b["edit_source"])
    c = rl_batch(ShapesRewards(), 2, 1, 0, 6)
    assert not torch.equal(a["gen_seed"], c["gen_seed"]) and a["edit_source"].shape == (1, 3, 64, 64)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_reward_tuning_moves_the_models_own_samples_towards_the_reward(tmp_path, sign):
    """Rewarding brightness makes the deterministic samples brighter; rewarding darkness makes them darker."""
    m, source = _model(), Brightness(sign)
    prompts, edits = source.held_out(1, 5)
    before = mean_rewards(m, source, prompts[:4], edits[:4])
    summary = reward_tune(m, _settings(train_steps=4), tmp_path, source, log=lambda msg: None)
    after = mean_rewards(m, source, prompts[:4], edits[:4])
    assert summary["steps"] == 4 and summary["cfg"] == 2.0 and math.isfinite(summary["final_loss"])
    assert after["t2i"] > before["t2i"] + 0.005 and after["edit"] > before["edit"] + 0.005
    log = (tmp_path / "train_log.csv").read_text().splitlines()
    assert log[0].split(",")[3:] == ["loss", "t2i_reward", "edit_reward"]


def test_reward_tuning_trains_an_epsilon_server_on_its_ddim_path(tmp_path):
    """The server teacher (epsilon prediction, no in-context width) is reward-tuned on generation alone."""
    m, source = tiny_bundle("shapes-server"), Brightness(-1.0)
    m.meta["sampler"] = {"steps": 6, "cfg": 2.0, "scheduler": "ddim"}
    prompts, _ = source.held_out(1, 5)
    before = mean_rewards(m, source, prompts[:4], [])
    summary = reward_tune(m, _settings(train_steps=4, edit_fraction=0), tmp_path, source, log=lambda msg: None)
    after = mean_rewards(m, source, prompts[:4], [])
    assert summary["steps"] == 4 and after["t2i"] > before["t2i"] + 0.005


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    s, source = _settings(train_steps=3, kl=0.1), Brightness()

    def run(folder):
        m = _model()
        reward_tune(m, s, folder, source, log=lambda msg: None)
        return m.unet.state_dict()

    straight = run(tmp_path / "straight")
    resumed = killed_then_resumed(monkeypatch, lambda: run(tmp_path / "split"))
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) < 1e-6


def test_settings_and_models_it_cannot_train_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValidationError, match="sde_steps: 6 must be fewer than steps 6"):
        _settings(sde_steps=6)
    with pytest.raises(ValidationError, match="train.batch: 10 images is not a whole number of groups of 4"):
        _settings(batch=10)
    with pytest.raises(DreamliteError, match="edit_fraction: tiny-shapes-server cannot edit"):
        reward_tune(tiny_bundle("shapes-server"), _settings(), tmp_path, ShapesRewards())
    with pytest.raises(DreamliteError, match="flow_shift: applies to flow-matching models"):
        reward_tune(tiny_bundle("shapes-server"), _settings(flow_shift=3.0, edit_fraction=0), tmp_path,
                    ShapesRewards())
    with pytest.raises(DreamliteError, match="tags: unknown 'colour'"):
        ShapesRewards(tags=["colour"])
    assert not any(tmp_path.iterdir())


def test_the_shapes_reward_is_the_share_of_geneval_clauses_met():
    from dreamlite.evaluation.shapes import Obj, Scene, render
    from dreamlite.evaluation.shapes.world import GenPrompt

    prompt = GenPrompt("position", (("circle", None), ("square", None)), relation="left of")
    circle = Obj("circle", "red", 0.7, 0.5, 0.25)
    right = render(Scene("black", (circle, Obj("square", "blue", 0.25, 0.5, 0.25))), 64)
    wrong = render(Scene("black", (circle, Obj("square", "blue", 0.7, 0.15, 0.25))), 64)
    alone = render(Scene("black", (circle,)), 64)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    scores = ShapesRewards().score_gen(np.stack([right, wrong, alone, noise]), [prompt] * 4)
    assert scores.tolist() == [1.0, 0.5, 0.5, 0.0]
