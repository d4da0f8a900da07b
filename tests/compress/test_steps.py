import copy

import numpy as np
import pytest
import torch

from dreamlite.compress.distill.steps import (StepDistillTask, StepSettings, flow_sigmas, segment_grids, step_distill,
                                              steps_batch)
from dreamlite.data import ShapesData
from dreamlite.io import DreamliteError
from dreamlite.models.sampler import SamplerSettings, UNetDenoiser, _branches, default_settings, denoise, generate
from dreamlite.train import TrainSettings

from conftest import killed_then_resumed, tiny_bundle

LATENT = (48, 16, 16)


def _settings(steps=4, teacher_steps=8, batch=4, train_steps=2, **kw) -> StepSettings:
    train = TrainSettings(steps=train_steps, batch=batch, warmup=1, log_every=1, checkpoint_every=1)
    return StepSettings(steps=steps, teacher_steps=teacher_steps, train=train, **kw)


def _task(student, teacher, s: StepSettings, cfg: float, image_cfg: float = 1.0) -> StepDistillTask:
    grids = segment_grids(s.steps, s.teacher_steps, 3.0)
    return StepDistillTask(student.unet, teacher.unet, student.text, student.codec, 64, grids, cfg, image_cfg)


def test_segments_start_on_the_samplers_own_grid_and_nest_the_teachers():
    grids = segment_grids(4, 8, 3.0)
    assert grids.shape == (4, 3)  # two teacher steps per student step
    assert torch.allclose(grids[:, 0], flow_sigmas(4, 3.0)[:-1]) and grids[-1, -1] == 0
    assert torch.equal(grids[1:, 0], grids[:-1, -1])  # segments tile [0, 1]
    assert torch.allclose(grids[:, :-1].flatten(), flow_sigmas(8, 3.0)[:-1])
    with pytest.raises(DreamliteError, match="teacher_steps: 6 is not a multiple of steps 4"):
        segment_grids(4, 6, 3.0)


def test_batches_are_pure_functions_of_seed_and_step():
    a, b = (steps_batch(ShapesData(), 2, 2, 4, 0, 5, LATENT) for _ in range(2))
    assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["segment"], b["segment"])
    assert a["t2i_captions"] == b["t2i_captions"] and a["edit_prompts"] == b["edit_prompts"]
    c = steps_batch(ShapesData(), 2, 2, 4, 0, 6, LATENT)
    assert not torch.equal(a["noise"], c["noise"])
    assert a["segment"].max() < 4 and a["noise"].shape == (4, *LATENT)


@pytest.mark.parametrize("editing", [False, True])
def test_the_target_lands_where_the_samplers_guided_euler_steps_land(editing):
    """One student step over the whole trajectory (steps 1) must reproduce the sampler's guided 4-step run of the
    teacher from the same noise: 2 branches to generate, 3 to edit."""
    teacher = tiny_bundle("shapes-mobile", seed=3)
    s = _settings(steps=1, teacher_steps=4)
    task = _task(teacher, teacher, s, cfg=3.0, image_cfg=1.5)
    noise = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "two stars"]
    source = torch.rand(2, *LATENT) * 2 - 1 if editing else None
    target = task.target(noise, torch.zeros(2, dtype=torch.long), prompts, source)
    settings = SamplerSettings(steps=4, cfg=3.0, image_cfg=1.5, flow_shift=3.0)
    ref = denoise(UNetDenoiser(teacher.unet, 64, 64), "flow", noise, _branches(teacher, prompts, source, settings),
                  settings)
    assert torch.allclose(noise - target, ref, atol=1e-4)


def test_without_guidance_one_teacher_step_per_student_step_is_the_teachers_own_velocity():
    student = tiny_bundle("shapes-mobile")
    task = _task(student, copy.deepcopy(student), _settings(steps=4, teacher_steps=4), cfg=1.0)
    loss, logs = task(**steps_batch(ShapesData(), 2, 2, 4, 0, 0, LATENT))
    assert loss < 1e-9 and set(logs) == {"t2i", "edit"}
    guided = _task(student, copy.deepcopy(student), _settings(steps=4, teacher_steps=4), cfg=4.0)
    assert guided(**steps_batch(ShapesData(), 2, 2, 4, 0, 0, LATENT))[0] > 1e-4


class Counting:
    def __init__(self, denoiser):
        self.denoiser, self.batches = denoiser, []

    def __call__(self, x, t, text):
        self.batches.append(x.shape[0])
        return self.denoiser(x, t, text)


def _pair():
    student, teacher = tiny_bundle("shapes-mobile"), tiny_bundle("shapes-mobile")
    student.meta["sampler"] = teacher.meta["sampler"] = {"steps": 20, "cfg": 3.5, "flow_shift": 3.0}
    return student, teacher


def test_step_distill_trains_and_samples_with_one_call_per_step(tmp_path):
    student, teacher = _pair()
    before = {k: v.clone() for k, v in student.unet.state_dict().items()}
    summary = step_distill(student, teacher, _settings(), tmp_path, ShapesData(), seed=0, log=lambda m: None)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"]) and summary["teacher_cfg"] == 3.5
    after = student.unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert student.meta["sampler"] == {"steps": 4, "cfg": 1.0, "image_cfg": 1.0, "flow_shift": 3.0}
    counting = Counting(UNetDenoiser(student.unet, 64, 64))
    generate(student, ["a circle", "a star"], default_settings(student), denoiser=counting)
    assert counting.batches == [2] * 4  # 4 steps, no guidance branches


def test_a_killed_step_distillation_resumes_to_the_same_weights(tmp_path, monkeypatch):
    def run(folder):
        student, teacher = _pair()
        step_distill(student, teacher, _settings(train_steps=3), folder, ShapesData(), log=lambda m: None)
        return student.unet.state_dict()

    straight = run(tmp_path / "straight")
    resumed = killed_then_resumed(monkeypatch, lambda: run(tmp_path / "split"))
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) < 1e-6


def test_step_distill_refuses_pairs_it_cannot_train(tmp_path):
    mobile, server = tiny_bundle("shapes-mobile"), tiny_bundle("shapes-server")
    with pytest.raises(DreamliteError, match="teacher: tiny-shapes-server predicts epsilon"):
        step_distill(mobile, server, _settings(), tmp_path, ShapesData())
    with pytest.raises(DreamliteError, match="teacher_steps: 6 is not a multiple of steps 4"):
        step_distill(mobile, tiny_bundle("shapes-mobile"), _settings(teacher_steps=6), tmp_path, ShapesData())
    assert not any(tmp_path.iterdir())  # refused before anything was written
