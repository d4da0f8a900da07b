import dataclasses
import types

import pytest
import torch
from diffusers import DDPMScheduler

from dreamlite.compress.distill import (EpsilonToFlow, FlowView, Phase, flow_noise, flow_velocity, recover, recover_batch,
                                        sample_sigmas)
from dreamlite.compress.distill.config import LossWeights
from dreamlite.compress.distill.features import FeatureProjector, Taps, matching_blocks
from dreamlite.compress.distill.recover import BatchSpec, RecoverTask
from dreamlite.data import ShapesData
from dreamlite.io import DreamliteError
from dreamlite.models.teacher import SCHEDULES, epsilon_of
from dreamlite.train import TrainSettings

from conftest import killed_then_resumed, tiny_bundle

LATENT = (48, 16, 16)


# ---------------------------------------------------------------------------------------- flow maths, no model
def test_flow_velocity_integrates_noise_to_data():
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    s, s_next = torch.tensor([0.8, 0.8]), torch.tensor([0.3, 0.3])
    x = flow_noise(x0, eps, s)
    stepped = x + (s_next - s).view(-1, 1, 1, 1) * flow_velocity(x0, eps)  # one exact Euler step
    assert torch.allclose(stepped, flow_noise(x0, eps, s_next), atol=1e-6)


@pytest.mark.parametrize("schedule", ["sdxl", "linear", "zero-snr"])
def test_flow_sigma_maps_to_the_teacher_timestep_of_equal_snr(schedule):
    ddpm = DDPMScheduler.from_config(SCHEDULES[schedule])
    conv = EpsilonToFlow.for_schedule(schedule, "v")
    t = torch.tensor([0, 10, 250, 500, 998, 999])
    a = ddpm.alphas_cumprod[t].double()
    sigma = (torch.sqrt(1 - a) / (torch.sqrt(a) + torch.sqrt(1 - a))).float()  # (1 - s) / s = sqrt(a / (1 - a))
    assert torch.allclose(conv.timestep(sigma), t.float(), atol=1e-2)
    # the rescaled flow sample is exactly the teacher's noised sample at that timestep
    x0, eps = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    assert torch.allclose(conv.teacher_input(flow_noise(x0, eps, sigma), sigma), ddpm.add_noise(x0, eps, t), atol=1e-5)
    assert conv.in_range(sigma).all() and not conv.in_range(torch.tensor([conv.sigma_max + 1e-3])).any()


def test_a_perfect_epsilon_teacher_gives_the_true_velocity():
    conv = EpsilonToFlow.for_schedule("sdxl")
    x0, eps = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    sigma = torch.tensor([0.05, 0.3, 0.6, 0.9])
    v = conv.velocity(eps, flow_noise(x0, eps, sigma), sigma)
    assert torch.allclose(v, flow_velocity(x0, eps), atol=1e-5)
    assert conv.sigma_max == pytest.approx(0.936, abs=1e-3)  # SDXL's last timestep: alpha_bar 0.0047


def test_a_perfect_v_teacher_gives_the_true_velocity():
    """A v-prediction teacher's output, at the rescaled input of equal SNR, converts to the flow velocity."""
    conv = EpsilonToFlow.for_schedule("sdxl")
    x0, eps = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    sigma = torch.tensor([0.05, 0.3, 0.6, 0.9])
    x = flow_noise(x0, eps, sigma)
    a = conv.alpha_bar(sigma, x)
    assert torch.allclose(conv.teacher_input(x, sigma), a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-5)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    eps_back = epsilon_of(v, conv.teacher_input(x, sigma), a, "v")
    assert torch.allclose(conv.velocity(eps_back, x, sigma), flow_velocity(x0, eps), atol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "flow"])
def test_flow_view_turns_a_perfect_model_of_any_parametrisation_into_the_true_velocity(prediction):
    """The wiring around the conversions: what the model is fed (rescaled input, timestep of equal SNR, zeros
    beside an in-context target) and how its output is read back."""
    from dreamlite.compress.distill import FlowView
    from dreamlite.models.text import TextStates

    conv = EpsilonToFlow.for_schedule("sdxl")
    x0, eps = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    sigma = torch.tensor([0.05, 0.3, 0.6, 0.95])
    x, seen = flow_noise(x0, eps, sigma), {}

    class Perfect(torch.nn.Module):
        config = {"addition_embed_type": None}

        def forward(self, xin, t, **kwargs):
            seen["x"], seen["t"] = xin, t
            a = conv.alpha_bar(sigma, x0)
            out = {"epsilon": eps, "v": a.sqrt() * eps - (1 - a).sqrt() * x0, "flow": eps - x0}[prediction]
            return types.SimpleNamespace(sample=torch.cat([out, torch.full_like(out, 9.0)], -1)
                                         if prediction == "flow" else out)

    text = TextStates(torch.zeros(4, 2, 8), torch.zeros(4, 8))
    v, valid = FlowView(Perfect(), prediction, "sdxl", in_context=prediction == "flow", image_size=16)(x, sigma, text)
    assert torch.allclose(v, flow_velocity(x0, eps), atol=1e-4)
    if prediction == "flow":
        assert seen["x"].shape[-1] == 8 and seen["x"][..., 4:].abs().sum() == 0  # zeros beside the target
        assert valid.tolist() == [1.0] * 4
    else:
        assert torch.allclose(seen["t"], conv.timestep(sigma))
        assert valid.tolist() == [1.0, 1.0, 1.0, 0.0]  # 0.95 is noisier than t = 999 of SDXL's schedule


def test_sigma_sampling_is_seeded_and_shift_moves_it_toward_noise():
    a = sample_sigmas(4096, torch.Generator().manual_seed(0))
    assert torch.equal(a, sample_sigmas(4096, torch.Generator().manual_seed(0)))
    assert 0 < a.min() and a.max() < 1 and abs(a.mean() - 0.5) < 0.02
    shifted = sample_sigmas(4096, torch.Generator().manual_seed(0), "uniform", shift=3.0)
    assert shifted.mean() > 0.65


# ------------------------------------------------------------------------------------------------- features
def test_feature_loss_is_zero_for_an_identical_teacher_and_reads_only_the_target_half():
    widths = matching_blocks({"block_out_channels": [8, 16]}, {"block_out_channels": [8, 16]})
    assert widths == {"down_blocks.0": (8, 8), "down_blocks.1": (16, 16), "mid_block": (16, 16),
                      "up_blocks.0": (16, 16), "up_blocks.1": (8, 8)}
    proj = FeatureProjector({"a": (4, 4)})
    with torch.no_grad():
        proj.proj[0].weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        proj.proj[0].bias.zero_()
    t = torch.randn(2, 4, 3, 3)
    assert proj({"a": t}, {"a": t}).abs().max() < 1e-6
    assert (proj({"a": t * 2}, {"a": t}) > 0.5).all()
    model = torch.nn.Sequential(torch.nn.Identity())
    taps = Taps(model, ["0"])
    model(torch.cat([t, torch.randn(2, 4, 3, 3)], -1))  # (target | anything)
    assert torch.equal(taps.pop(target_half=True)["0"], t) and taps.pop() == {}


def test_feature_distillation_refuses_teachers_with_another_number_of_stages():
    with pytest.raises(DreamliteError, match="resolution stages"):
        matching_blocks({"block_out_channels": [8, 16, 16]}, {"block_out_channels": [8, 16]})


# ---------------------------------------------------------------------------------------------------- batches
def test_batches_are_pure_functions_of_seed_and_step_and_split_by_task():
    spec = BatchSpec(t2i=2, edit=3, caption_dropout=0.0, text_dropout=0.0, image_dropout=0.0)
    a, b = (recover_batch(ShapesData(), spec, 5, 9, LATENT) for _ in range(2))
    assert a["t2i_captions"] == b["t2i_captions"] and torch.equal(a["edit_noise"], b["edit_noise"])
    assert a["t2i_images"].shape == (2, 3, 64, 64) and a["edit_source"].shape == (3, 3, 64, 64)
    assert a["t2i_noise"].shape == (2, *LATENT) and a["edit_sigma"].shape == (3,)
    assert a["edit_keep_source"].tolist() == [1.0, 1.0, 1.0]
    assert not torch.equal(a["t2i_noise"], recover_batch(ShapesData(), spec, 5, 10, LATENT)["t2i_noise"])
    dropped = recover_batch(ShapesData(), BatchSpec(4, 4, 0.999, 0.999, 0.999), 5, 9, LATENT)
    assert set(dropped["t2i_captions"]) == {""} and set(dropped["edit_prompts"]) == {""}
    assert dropped["edit_keep_source"].sum() == 0


def test_editing_samples_take_their_own_sigma_shift():
    from dreamlite.compress.distill.flow import shift_sigmas

    s = torch.linspace(0, 1, 11)
    assert shift_sigmas(s, 1.0).equal(s) and shift_sigmas(s, 4.0)[[0, -1]].tolist() == [0.0, 1.0]
    assert (shift_sigmas(s, 4.0)[1:-1] > s[1:-1]).all()  # more noise everywhere in between
    spec = BatchSpec(t2i=3, edit=5, caption_dropout=0.0, text_dropout=0.0, image_dropout=0.0)
    same, shifted = (recover_batch(ShapesData(), dataclasses.replace(spec, edit_shift=k), 5, 9, LATENT) for k in (None, 4.0))
    assert torch.equal(same["t2i_sigma"], shifted["t2i_sigma"])  # text-to-image samples untouched
    assert torch.allclose(shifted["edit_sigma"], shift_sigmas(same["edit_sigma"], 4.0))
    assert torch.equal(same["edit_noise"], shifted["edit_noise"]) and same["edit_prompts"] == shifted["edit_prompts"]


def test_identity_edits_copy_the_source_with_an_empty_instruction_and_leave_the_rest_of_the_batch():
    spec = BatchSpec(t2i=2, edit=8, caption_dropout=0.0, text_dropout=0.0, image_dropout=0.0)
    plain, mixed = (recover_batch(ShapesData(), dataclasses.replace(spec, identity=k), 5, 9, LATENT) for k in (0, 0.5))
    copied = [i for i, p in enumerate(mixed["edit_prompts"]) if p == ""]
    assert 0 < len(copied) < 8  # some, not all, of the eight
    for i in range(8):
        same_image = torch.equal(mixed["edit_target"][i], mixed["edit_source"][i])
        assert same_image == (i in copied)  # an identity edit's target is its source; a real edit changes it
        if i not in copied:
            assert mixed["edit_prompts"][i] == plain["edit_prompts"][i]
            assert torch.equal(mixed["edit_target"][i], plain["edit_target"][i])
    for key in ("t2i_images", "t2i_noise", "edit_source", "edit_noise", "edit_sigma", "edit_keep_source"):
        assert torch.equal(plain[key], mixed[key]), key
    with pytest.raises(ValueError, match="identity_fraction"):
        Phase(task="edit", train=TrainSettings(steps=1, batch=2), identity_fraction=1.0)


def test_phase_counts_and_joint_split():
    s = TrainSettings(steps=1, batch=8, accumulate=2)
    assert Phase(task="joint", train=s, edit_fraction=0.25).counts() == (6, 2)
    assert Phase(task="edit", train=s).counts() == (0, 8)
    with pytest.raises(ValueError, match="must divide by accumulate"):
        Phase(task="joint", train=s, edit_fraction=0.125)


# ----------------------------------------------------------------------------------------------------- the task
def test_cached_text_states_equal_the_encoders_even_when_the_cache_fills():
    from dreamlite.compress.distill.recover import CachedText
    text = tiny_bundle("shapes-mobile").text
    cached = CachedText(text, capacity=3)
    for batch in (["a circle", "a star"], ["a star", "two squares"], ["a circle", "a red cross", "a star"]):
        got, want = cached.encode(batch), text.encode(batch)
        assert torch.allclose(got.states, want.states, atol=1e-6) and torch.allclose(got.pooled, want.pooled, atol=1e-6)
    assert len(cached.cache) <= 3



def _batch(t2i=2, edit=2):
    return recover_batch(ShapesData(), BatchSpec(t2i, edit), 0, 0, LATENT)


def test_output_distillation_vanishes_when_the_teacher_is_the_student():
    s = tiny_bundle("shapes-mobile")
    task = RecoverTask(s.unet, s.text, s.codec, 64, True, s.unet, "flow", teacher_in_context=True)
    loss, logs = task(**_batch(2, 0))
    assert logs["kd_out"] < 1e-10 and torch.isfinite(loss) and logs["kd_feat"] > 0


def test_only_the_target_half_is_trained():
    s = tiny_bundle("shapes-mobile")
    task = RecoverTask(s.unet, s.text, s.codec, 64, True)
    batch = _batch(0, 2)
    loss, _ = task(**batch)
    # the prediction on the context half never reaches the loss: the output's right half has zero gradient
    out = {}
    handle = s.unet.conv_out.register_forward_hook(lambda m, a, o: out.setdefault("o", o.retain_grad() or o))
    task(**batch)[0].backward()
    handle.remove()
    grad = out["o"].grad
    assert grad[..., 16:].abs().max() == 0 and grad[..., :16].abs().max() > 0


# ------------------------------------------------------------------------------------------------ recover()
PHASES = [{"task": "t2i"}, {"task": "edit"}, {"task": "joint"}]


def _phases(steps=2, **train):
    s = TrainSettings(**{"steps": steps, "batch": 4, "warmup": 1, "log_every": 1, "checkpoint_every": 1, **train})
    return [Phase(train=s, **p) for p in PHASES]


def _weights(bundle):
    return {k: v.detach().clone() for k, v in bundle.unet.state_dict().items()}


def test_recover_trains_every_phase_and_resumes_exactly(tmp_path, monkeypatch):
    student, teacher = tiny_bundle("shapes-mobile"), tiny_bundle("shapes-server")
    before = _weights(student)
    torch.manual_seed(0)
    summaries = recover(student, teacher, _phases(), tmp_path / "straight", ShapesData(), log=lambda m: None)
    straight = _weights(student)
    assert [s["phase"] for s in summaries] == ["t2i", "edit", "joint"]
    assert all(s["final_loss"] > 0 for s in summaries)
    assert any(not torch.equal(before[k], straight[k]) for k in before)
    header = (tmp_path / "straight" / "01-t2i" / "train_log.csv").read_text().splitlines()[0]
    assert header.split(",")[3:] == ["loss", "t2i", "kd_out", "kd_feat"]
    assert (tmp_path / "straight" / "03-joint" / "loss.png").is_file()
    # the feature-distillation hooks are gone: both U-Nets are as the caller gave them
    assert not any(m._forward_hooks for u in (student.unet, teacher.unet) for m in u.modules())

    # killed after the edit phase's first checkpoint, then run again from a fresh process state
    def run(seed: int):
        student, teacher = tiny_bundle("shapes-mobile"), tiny_bundle("shapes-server")
        torch.manual_seed(seed)  # the re-run draws a different initial projection: the checkpoint must restore it
        recover(student, teacher, _phases(), tmp_path / "split", ShapesData(), log=lambda m: None)
        return student

    seeds = iter([0, 1])
    student = killed_then_resumed(monkeypatch, lambda: run(next(seeds)), lambda path: "02-edit" in str(path))
    resumed = _weights(student)
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) < 1e-6


def test_continuing_a_recovered_student_with_feature_distillation_says_its_projections_start_fresh(tmp_path):
    student, teacher = tiny_bundle("shapes-mobile"), tiny_bundle("shapes-server")
    student.meta["stage"] = "recover"  # what a recover stage's model/ records
    train = TrainSettings(steps=1, batch=2, warmup=0, log_every=1, checkpoint_every=1)
    for feature, said in ((1.0, True), (0.0, False)):
        logs = []
        recover(student, teacher, [Phase(task="t2i", train=train, weights=LossWeights(feature=feature))],
                tmp_path / str(feature), ShapesData(), log=logs.append)
        assert any("projections start fresh" in m for m in logs) == said


def test_feature_projections_reload_only_onto_the_same_teacher_and_widths(tmp_path):
    student, teacher = tiny_bundle("shapes-mobile"), tiny_bundle("shapes-server")
    blocks = matching_blocks(student.unet.config, teacher.unet.config)
    torch.manual_seed(0)
    saved = FeatureProjector(blocks)
    saved.save(tmp_path / "p.safetensors", "teacher-a")
    torch.manual_seed(1)
    fresh = FeatureProjector(blocks)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert "teacher-a" in fresh.load(tmp_path / "p.safetensors", "teacher-b")
    assert "no q.safetensors" in fresh.load(tmp_path / "q.safetensors", "teacher-a")
    wider = FeatureProjector({k: (s + 1, t) for k, (s, t) in blocks.items()})
    assert "other block widths" in wider.load(tmp_path / "p.safetensors", "teacher-a")
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # refused: left as it was
    assert fresh.load(tmp_path / "p.safetensors", "teacher-a") is None
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in fresh.state_dict().items())
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    assert "not readable" in fresh.load(tmp_path / "bad.safetensors", "teacher-a")


def test_recover_refuses_students_it_cannot_train_before_training(tmp_path):
    server = tiny_bundle("shapes-server")
    with pytest.raises(DreamliteError, match="editing needs an in-context student"):
        recover(server, None, _phases(), tmp_path, ShapesData())
    student = tiny_bundle("shapes-mobile")
    from dreamlite.models.text import ShapesTextEncoder
    student.text = ShapesTextEncoder.for_shapes(width=24, layers=1, heads=2, ff=32)
    with pytest.raises(DreamliteError, match="takes 16-wide text states and its text encoder gives 24"):
        recover(student, None, _phases(), tmp_path, ShapesData())
    student = tiny_bundle("shapes-mobile")
    teacher = tiny_bundle("shapes-server", seed=1)  # another text encoder
    with pytest.raises(DreamliteError, match="text encoder differs"):
        recover(student, teacher, _phases(), tmp_path, ShapesData())
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ held-out losses
def test_held_out_losses_are_fixed_per_model_and_measure_the_source():
    from dreamlite.compress.distill.heldout import held_out_losses

    a, b = tiny_bundle("shapes-mobile", seed=0), tiny_bundle("shapes-mobile", seed=1)
    a.unet.train()
    first = held_out_losses(a, ShapesData(), n=4, sigmas=(0.8, 0.2))
    assert a.unet.training  # put back as it was
    assert held_out_losses(a, ShapesData(), n=4, sigmas=(0.8, 0.2)) == first  # same samples, same noise
    assert held_out_losses(b, ShapesData(), n=4, sigmas=(0.8, 0.2))["t2i"] != first["t2i"]
    assert set(first) == {"t2i", "edit", "edit_without_source", "source_gain", "copy_source"}
    for s in ("0.8", "0.2"):
        gain = first["edit_without_source"]["per_sigma"][s] - first["edit"]["per_sigma"][s]
        assert first["source_gain"]["per_sigma"][s] == pytest.approx(gain, abs=2e-5)
    assert first["source_gain"]["mean"] != 0  # a random in-context U-Net already reads its context half


def test_teacher_held_out_losses_share_the_students_samples_and_leave_out_what_the_schedule_misses():
    from dreamlite.compress.distill.heldout import held_out_losses, teacher_held_out_losses

    student = tiny_bundle("shapes-mobile")
    # a flow teacher is seen as it is: its row is held_out_losses' own text-to-image row (same scenes, same noise)
    assert teacher_held_out_losses(student, ShapesData(), n=4, sigmas=(0.8, 0.2))["t2i"] == \
        held_out_losses(student, ShapesData(), n=4, sigmas=(0.8, 0.2))["t2i"]
    server = tiny_bundle("shapes-server")  # epsilon on SDXL's schedule: it reaches sigma 0.936, not 1
    row = teacher_held_out_losses(server, ShapesData(), n=4, sigmas=(1.0, 0.5, 0.1), student=student)["t2i"]
    assert row["per_sigma"]["1.0"] is None and row["per_sigma"]["0.5"] > 0 and row["per_sigma"]["0.1"] > 0
    assert row["mean"] == pytest.approx((row["per_sigma"]["0.5"] + row["per_sigma"]["0.1"]) / 2, abs=1e-5)


def test_held_out_report_refuses_models_it_cannot_measure_on_the_same_samples():
    from dreamlite.compress.distill.heldout import held_out_report

    student = tiny_bundle("shapes-mobile")
    with pytest.raises(DreamliteError, match="these work at .* 64 px, .* 32 px"):
        held_out_report({"a": student, "b": dataclasses.replace(student, image_size=32)}, ShapesData(), n=2)
    with pytest.raises(DreamliteError, match="an epsilon model is measured on text-to-image samples"):
        held_out_report({"server": tiny_bundle("shapes-server")}, ShapesData(), n=2, tasks=("edit",))


def test_teacher_worse_from_is_the_lowest_sigma_where_the_teacher_loses():
    from dreamlite.compress.distill.heldout import teacher_worse_from

    student = {"per_sigma": {"1.0": 0.2, "0.9": 0.08, "0.7": 0.05, "0.5": 0.05, "0.1": 0.24}}
    teacher = {"per_sigma": {"1.0": None, "0.9": 0.4, "0.7": 0.06, "0.5": 0.03, "0.1": 0.12}}
    assert teacher_worse_from(teacher, student) == 0.7
    better = {"per_sigma": {"1.0": None, "0.9": 0.01, "0.7": 0.01, "0.5": 0.01, "0.1": 0.01}}
    assert teacher_worse_from(better, student) is None


class _CopySource(torch.nn.Module):
    """A "U-Net" that predicts the source as the clean image: velocity ``x_s - source`` at sigma 1."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward(self, x, t, **kwargs):
        w = x.shape[-1] // 2
        return types.SimpleNamespace(sample=torch.cat([x[..., :w] - x[..., w:], x[..., w:]], -1))


def test_copy_source_is_the_sigma_1_loss_of_copying_the_source():
    from dreamlite.compress.distill.heldout import held_out_losses

    student = tiny_bundle("shapes-mobile")
    copier = dataclasses.replace(student, unet=_CopySource(student.unet.config))
    out = held_out_losses(copier, ShapesData(), n=4, sigmas=(1.0,))
    assert out["copy_source"]["mean"] == pytest.approx(out["edit"]["per_sigma"]["1.0"], rel=1e-4)
    assert 0 < out["copy_source"]["mean"] < out["edit_without_source"]["mean"]  # edits change little of the image
    assert held_out_losses(student, ShapesData(), n=4, sigmas=(1.0,))["copy_source"] == out["copy_source"]


def test_held_out_losses_of_a_model_without_context_width_are_text_to_image_only():
    from dreamlite.compress.distill.heldout import held_out_losses

    out = held_out_losses(tiny_bundle("shapes-server"), ShapesData(), n=2, sigmas=(0.5,))
    assert set(out) == {"t2i"} and out["t2i"]["mean"] > 0


def test_held_out_losses_read_only_the_tasks_the_data_has(tmp_path):
    from PIL import Image

    from dreamlite.compress.distill.heldout import held_out_losses
    from dreamlite.data import FolderData

    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "a.png")
    (tmp_path / "t2i.jsonl").write_text('{"image": "a.png", "caption": "a red circle"}\n')  # no edit triplets
    data = FolderData(tmp_path, 64)
    assert data.tasks == ("t2i",)  # what it has, as the CLI's held-out passes on
    out = held_out_losses(tiny_bundle("shapes-mobile"), data, n=2, sigmas=(0.5,), tasks=data.tasks)
    assert set(out) == {"t2i"}


def test_zero_terminal_snr_maps_sigma_one_to_the_last_timestep_and_a_v_teacher_stays_finite():
    """On the zero-snr schedule t = 999 is pure noise: sigma 1 maps to it, the segment before it (log-SNR -inf at
    one end) is interpolated in sigma, and a perfect v teacher gives the true velocity up to sigma 1, where an epsilon
    model's (eps - x) / (1 - s) would divide by zero (so an epsilon model on it is refused)."""
    conv = EpsilonToFlow.for_schedule("zero-snr", "v")
    assert conv.sigma_max == 1.0
    sigma = torch.tensor([0.5, 0.99, 0.999, 0.9999, 1.0])
    t = conv.timestep(sigma)
    assert torch.isfinite(t).all() and (t.diff() > 0).all() and t[-1] == 999.0 and conv.in_range(sigma).all()
    x0, eps = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    x = flow_noise(x0, eps, sigma)
    a = conv.alpha_bar(sigma, x)
    v = conv.velocity(a.sqrt() * eps - (1 - a).sqrt() * x0, x, sigma, "v")
    assert torch.allclose(v, flow_velocity(x0, eps), atol=1e-5)
    with pytest.raises(DreamliteError, match="schedule zero-snr: an epsilon model on it cannot be seen as a flow"):
        EpsilonToFlow.for_schedule("zero-snr", "epsilon")


def test_a_zero_snr_v_teacher_gives_finite_targets_at_pure_noise(tiny_server, tiny_mobile):
    """The recover stage takes a v teacher on the zero-snr schedule: the pair passes its checks, and the teacher's
    velocity (the output-distillation target) is finite and in range up to pure noise."""
    from dreamlite.compress.distill.recover import check_pair
    tiny_server.prediction, tiny_server.meta["schedule"] = "v", "zero-snr"
    check_pair(tiny_mobile, tiny_server, edits=True)
    view = FlowView(tiny_server.unet, "v", "zero-snr", image_size=64)
    x, sigma = torch.randn(2, 48, 16, 16), torch.tensor([0.5, 1.0])
    text = tiny_server.text.encode(["a red circle", "a blue star"])
    v, valid = view(x, sigma, text)
    assert torch.isfinite(v).all() and valid.tolist() == [1.0, 1.0]


def test_a_zero_snr_v_server_is_reward_tuned_from_pure_noise(tiny_server):
    """Reward tuning sees a server on the flow path along its DDIM trajectory: on the zero-snr schedule that starts
    at sigma 1 (t = 999, noise scale 1) and every step's estimates stay finite."""
    from dreamlite.compress.distill.rl import RLSettings, check_rl, estimates, trajectory
    from dreamlite.evaluation.rewards import ShapesRewards
    tiny_server.prediction, tiny_server.meta["schedule"] = "v", "zero-snr"
    settings = RLSettings(steps=4, sde_steps=1, group=2, edit_fraction=0, train={"steps": 1, "batch": 4})
    path = trajectory(tiny_server, check_rl(tiny_server, settings, ShapesRewards(64)))
    assert float(path.sigmas[0]) == 1.0 and path.noise_scale == 1.0
    view = FlowView(tiny_server.unet, "v", "zero-snr", image_size=64)
    x, sigma = torch.randn(1, 48, 16, 16), path.sigmas[:1]
    x0, eps = estimates(view(x, sigma, tiny_server.text.encode(["a red circle"]))[0], x, sigma, path.clip)
    assert torch.isfinite(x0).all() and torch.allclose(eps, x, atol=1e-5)  # at pure noise the noise is the sample
