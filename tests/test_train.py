import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreamlite.io import DreamliteError
from dreamlite.models.teacher import EpsilonTask, clean_of, epsilon_of, snr_weight, t2i_batch
from dreamlite.train import CHECKPOINT, TrainSettings, batch_stream, fit, lr_at

from conftest import tiny_bundle


def test_lr_schedule():
    s = TrainSettings(steps=100, lr=1.0, warmup=10, decay="cosine", final_lr=0.1)
    assert lr_at(0, s) == pytest.approx(0.1) and lr_at(9, s) == pytest.approx(1.0)
    assert lr_at(10, s) == pytest.approx(1.0) and lr_at(100, s) == pytest.approx(0.1)
    assert lr_at(55, s) == pytest.approx(0.55)
    assert lr_at(50, TrainSettings(steps=100, lr=1.0, warmup=0, decay="constant")) == 1.0


def test_settings_reject_indivisible_batches():
    with pytest.raises(ValueError, match="not divisible by accumulate"):
        TrainSettings(steps=1, batch=6, accumulate=4)


def _teacher(seed=0):
    b = tiny_bundle("shapes-server", seed)
    task = EpsilonTask(b.unet, b.text, b.codec)
    return task, (lambda step: t2i_batch(7, step, 4, (48, 16, 16)))


def test_binding_objective_adds_to_the_loss_and_its_head_trains_with_the_task():
    b = tiny_bundle("shapes-server", 0)
    batch = t2i_batch(7, 0, 4, (48, 16, 16), caption_dropout=0.0)
    plain, _ = EpsilonTask(b.unet, b.text, b.codec)(**batch)
    task = EpsilonTask(b.unet, b.text, b.codec, binding_weight=0.5)
    loss, logs = task(**batch)
    assert loss.item() == pytest.approx(plain.item() + 0.5 * logs["binding"].item(), rel=1e-5)
    assert logs["binding"] > 0 and "binding.color.weight" in dict(task.named_parameters())


def _weights(task):
    return {k: v.clone() for k, v in task.state_dict().items()}


def test_batches_are_a_pure_function_of_seed_and_step():
    a, b = t2i_batch(7, 3, 4, (48, 16, 16)), t2i_batch(7, 3, 4, (48, 16, 16))
    assert a["captions"] == b["captions"] and torch.equal(a["noise"], b["noise"]) and torch.equal(a["images"], b["images"])
    assert not torch.equal(a["noise"], t2i_batch(7, 4, 4, (48, 16, 16))["noise"])


def _pid_batch(step: int) -> dict:
    if step == 3:
        raise DreamliteError("data: runs/x/3.png: cannot read the image")
    return {"pid": torch.tensor([os.getpid()]), **t2i_batch(7, step, 4, (48, 16, 16))}


def test_a_worker_process_draws_the_same_batches_and_bad_data_stops_with_one_line():
    drawn = list(batch_stream(_pid_batch, range(3), workers=1))
    assert all(d["pid"].item() != os.getpid() for d in drawn)  # drawn ahead, in another process
    for d, step in zip(drawn, range(3)):
        inline = _pid_batch(step)
        assert d["captions"] == inline["captions"]
        assert all(torch.equal(d[k], inline[k]) for k in ("images", "noise", "timesteps", "offset"))
    with pytest.raises(DreamliteError) as failed:
        list(batch_stream(_pid_batch, range(5), workers=1))
    assert str(failed.value) == "data: runs/x/3.png: cannot read the image"  # no worker traceback folded in


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    s = TrainSettings(steps=4, batch=4, lr=1e-3, warmup=1, checkpoint_every=2, log_every=1, workers=1)
    task, batches = _teacher()
    fit(task, batches, s, tmp_path / "straight", log=lambda m: None)
    straight = _weights(task)

    task, batches = _teacher()
    fit(task, batches, s.model_copy(update={"steps": 2}), tmp_path / "split", log=lambda m: None)  # "killed" at 2
    task, batches = _teacher()  # a fresh process: same init, then the checkpoint
    fit(task, batches, s, tmp_path / "split", log=lambda m: None)
    resumed = _weights(task)
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-6) for k in straight)
    rows = (tmp_path / "split" / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]  # the log has each step once
    assert (tmp_path / "split" / "loss.png").stat().st_size > 1000


class Exploding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return (self.w * x).sum() * (float("nan") if x[0] > 2 else 1.0), {}


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path):
    s = TrainSettings(steps=6, batch=1, checkpoint_every=2, log_every=1, warmup=0)
    with pytest.raises(DreamliteError, match=f"loss is nan at step 3.*{CHECKPOINT}"):
        fit(Exploding(), lambda step: {"x": torch.tensor([float(step)])}, s, tmp_path, log=lambda m: None)
    assert (tmp_path / CHECKPOINT).is_file()


@pytest.mark.parametrize("var, name", [("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
                                       ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")])
def test_launches_the_loop_does_not_drive_are_refused_before_training(tmp_path, monkeypatch, var, name):
    """`accelerate launch --use_deepspeed` (or Megatron-LM) sets these; the loop drives only DDP and FSDP."""
    monkeypatch.setenv(var, "true")
    s = TrainSettings(steps=2, batch=1, warmup=0)
    with pytest.raises(DreamliteError, match=f"accelerate: {name} is not supported.*--use_fsdp"):
        fit(Exploding(), lambda step: {"x": torch.tensor([1.0])}, s, tmp_path / "run", log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_offset_noise_shifts_each_image_by_one_colour():
    from dreamlite.models.codec import PixelUnshuffleCodec
    from dreamlite.models.teacher import offset_noise
    codec = PixelUnshuffleCodec()
    noise, offset = torch.zeros(2, 48, 16, 16), torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1).repeat(2, 1, 1, 1)
    image = codec.decode(offset_noise(noise, offset, 0.1, codec, (64, 64)))
    assert torch.allclose(image[:, 0], torch.full((2, 64, 64), 0.1)) and torch.allclose(image[:, 1], torch.tensor(-0.2))
    assert torch.equal(offset_noise(noise, offset, 0.0, codec, (64, 64)), noise)


def test_fsdp_resumes_exactly_and_follows_one_process(tmp_path):
    """Two processes under `accelerate launch --use_fsdp` (gloo on CPU): killed after 2 of 4 steps and run again,
    the sharded run ends where an uninterrupted sharded run ends (1e-6), and near one process with the same global
    batch; gradient accumulation holds the reduce-scatter until the last micro-batch."""
    from safetensors.torch import load_file
    from tiny_fit import Tiny
    script = str(Path(__file__).with_name("tiny_fit.py"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fsdp = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
            "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", script]
    runs = [([sys.executable, script], "one", 4), (fsdp, "whole", 4), (fsdp, "split", 2), (fsdp, "split", 4)]
    for cmd, name, steps in runs:
        done = subprocess.run([*cmd, str(tmp_path / name), str(steps)], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-6000:]  # the launcher's own traceback takes the last 2,000
    assert "resuming at step 2" in done.stdout and "FSDP2: layers sharded over 2 processes" in done.stdout
    one, whole, split = (load_file(tmp_path / name / "final.safetensors") for name in ("one", "whole", "split"))
    start = Tiny().state_dict()
    assert all(torch.allclose(whole[k], split[k], atol=1e-6) for k in one)
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert moved > 1e-3 and max((one[k] - whole[k]).abs().max().item() for k in one) < 0.05 * moved
    assert torch.equal(whole["frozen.weight"], start["frozen.weight"])


def test_snr_weight_is_an_x0_loss_clamped_at_both_ends():
    """An x0 error d is an epsilon error d * sqrt(SNR), so weight * SNR is the weight the loss puts on x0 errors."""
    snr = torch.tensor([0.005, 0.5, 2.0, 20.0])
    assert torch.equal(snr_weight(snr, None, None), torch.ones(4))
    assert torch.allclose(snr_weight(snr, 5.0) * snr, torch.tensor([0.005, 0.5, 2.0, 5.0]))  # Min-SNR-5
    assert torch.allclose(snr_weight(snr, 5.0, 1.0) * snr, torch.tensor([1.0, 1.0, 2.0, 5.0]))  # + truncated SNR
    assert snr_weight(snr, 5.0, 1.0)[0] == pytest.approx(200.0)  # t = 999 counts, where the layout is decided
    # a v error d is an x0 error d / sqrt(SNR + 1): the same x0 weighting for a v-prediction model
    assert torch.allclose(snr_weight(snr, 5.0, None, "v") * (snr + 1), torch.tensor([0.005, 0.5, 2.0, 5.0]))


def test_v_prediction_task_regresses_the_velocity():
    """With prediction "v" the target is sqrt(a) eps - sqrt(1 - a) x0: an oracle U-Net that returns it has loss 0."""
    b = tiny_bundle("shapes-server", 0)
    batch = t2i_batch(7, 0, 4, (48, 16, 16))
    task = EpsilonTask(b.unet, b.text, b.codec, snr_gamma=None, prediction="v")
    x0 = b.codec.encode(batch["images"])
    a = task.schedule.alphas_cumprod[batch["timesteps"]].view(-1, 1, 1, 1)
    velocity = a.sqrt() * batch["noise"] - (1 - a).sqrt() * x0
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * batch["noise"]
    assert torch.allclose(epsilon_of(velocity, noisy, a, "v"), batch["noise"], atol=1e-5)
    assert torch.allclose(clean_of(batch["noise"], noisy, a), x0, atol=1e-3)  # 1 / sqrt(a) amplifies rounding

    class Oracle(torch.nn.Module):
        config = b.unet.config

        def forward(self, x, t, **kw):
            return type("Out", (), {"sample": velocity})

    task.unet = Oracle()
    assert task(**batch)[0].item() == pytest.approx(0.0, abs=1e-10)
    task.prediction = "epsilon"
    assert task(**batch)[0].item() > 0.1
