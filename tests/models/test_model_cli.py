import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dreamlite.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("preset, params", [("sdxl", 2_567_463_684), ("dreamlite-0.39b", 389_968_388)])
def test_info_reports_the_real_parameter_counts(preset, params):
    r = invoke("info", preset, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["parameters"] == params and report["macs_per_call"] > 1e12 and report["bytes_on_disk"] is None


def test_info_on_a_folder_counts_its_bytes(tiny_folders):
    r = invoke("info", tiny_folders["shapes-mobile"], "--json")
    report = json.loads(r.output)
    assert report["class"] == "DreamLiteUNetModel" and report["in_context"] and report["bytes_on_disk"] > 0


def test_saved_folders_load_in_diffusers_own_classes(tiny_folders):
    from diffusers import DreamLiteUNetModel, UNet2DConditionModel
    assert UNet2DConditionModel.from_pretrained(tiny_folders["shapes-server"]).config.in_channels == 48
    assert DreamLiteUNetModel.from_pretrained(tiny_folders["shapes-mobile"]).config.use_sep_conv


def test_a_v_model_on_zero_snr_saves_its_schedule_for_diffusers(tmp_path):
    """Beside the U-Net, an epsilon or v model's folder holds its training schedule as a diffusers scheduler, so a
    diffusers user knows what the U-Net predicts and on which noise levels (here: v, zero terminal SNR)."""
    from diffusers import DDPMScheduler, DreamLiteUNetModel

    from conftest import tiny_bundle
    server = tiny_bundle("shapes-server")
    server.prediction, server.meta["schedule"] = "v", "zero-snr"
    server.save_pretrained(tmp_path / "server")
    s = DDPMScheduler.from_pretrained(tmp_path / "server", subfolder="scheduler")
    assert s.config.prediction_type == "v_prediction" and float(s.alphas_cumprod[-1]) == 0.0
    tiny_bundle("shapes-mobile").save_pretrained(tmp_path / "mobile")  # a flow model: its sampler is in dreamlite.json
    assert not (tmp_path / "mobile" / "scheduler").exists()
    assert DreamLiteUNetModel.from_pretrained(tmp_path / "mobile").config.use_sep_conv


def test_folder_records_the_training_schedule_the_sampler_uses(tiny_folders, tmp_path):
    import shutil

    from dreamlite.models.bundle import load_bundle
    from dreamlite.models.sampler import make_scheduler
    assert json.loads((tiny_folders["shapes-server"] / "dreamlite.json").read_text())["schedule"] == "sdxl"
    other = tmp_path / "linear"
    shutil.copytree(tiny_folders["shapes-server"], other)
    meta = json.loads((other / "dreamlite.json").read_text())
    (other / "dreamlite.json").write_text(json.dumps({**meta, "schedule": "linear"}))
    assert load_bundle(str(other)).schedule == "linear" and load_bundle("sdxl", meta=True).schedule == "sdxl"
    linear, sdxl = make_scheduler("epsilon", 10, schedule="linear"), make_scheduler("epsilon", 10, schedule="sdxl")
    assert linear.timesteps[0] == 999 and linear.alphas_cumprod[-1] < 1e-4 < 1e-3 < sdxl.alphas_cumprod[-1]
    bad = tmp_path / "bad"
    shutil.copytree(tiny_folders["shapes-server"], bad)
    meta = json.loads((bad / "dreamlite.json").read_text())
    (bad / "dreamlite.json").write_text(json.dumps({**meta, "schedule": "cosine"}))
    r = invoke("info", bad)
    assert r.exit_code == 1 and "schedule: 'cosine' is not one of sdxl, linear" in r.output, r.output


def test_sample_then_edit(tiny_folders, tmp_path):
    r = invoke("sample", "--model", tiny_folders["shapes-mobile"], "--prompt", "a red circle", "--steps", 2,
               "--flow-shift", 3, "--out", tmp_path / "x.png")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "x.png").size == (64, 64)
    r = invoke("edit", "--model", tiny_folders["shapes-mobile"], "--image", tmp_path / "x.png", "--prompt",
               "make the circle blue", "--steps", 2, "--out", tmp_path / "y.png")
    assert r.exit_code == 0, r.output
    assert np.asarray(Image.open(tmp_path / "y.png")).shape == (64, 64, 3)


def test_sampling_takes_the_models_own_scheduler_unless_told(tiny_folders, tmp_path):
    """A model's dreamlite.json may name a stochastic sampler as its default; --scheduler overrides it, and every
    sampler the library knows is offered."""
    import shutil
    from typing import get_args

    from dreamlite.cli import SCHEDULERS
    from dreamlite.models.sampler import Scheduler
    assert SCHEDULERS == get_args(Scheduler)
    model = tmp_path / "ddpm-default"
    shutil.copytree(tiny_folders["shapes-server"], model)
    meta = json.loads((model / "dreamlite.json").read_text())
    (model / "dreamlite.json").write_text(json.dumps({**meta, "sampler": {"scheduler": "ddpm"}}))
    images = {}
    for name, extra in [("own", []), ("ddpm", ["--scheduler", "ddpm"]), ("ddim", ["--scheduler", "ddim"])]:
        r = invoke("sample", "--model", model, "--prompt", "a red circle", "--steps", 3, *extra,
                   "--out", tmp_path / f"{name}.png")
        assert r.exit_code == 0, r.output
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    assert np.array_equal(images["own"], images["ddpm"]) and not np.array_equal(images["own"], images["ddim"])
    (model / "dreamlite.json").write_text(json.dumps({**meta, "sampler": {"scheduler": "heun"}}))
    r = invoke("sample", "--model", model, "--prompt", "a red circle", "--out", tmp_path / "x.png")
    assert r.exit_code == 1 and "scheduler: 'heun' is not one of ddim, euler, ddpm, dpm-sde" in r.output, r.output


def test_edit_refuses_or_resizes_a_wrong_size_image(tiny_folders, tmp_path):
    Image.new("RGB", (100, 80)).save(tmp_path / "big.png")
    args = ["edit", "--model", tiny_folders["shapes-mobile"], "--image", tmp_path / "big.png", "--prompt",
            "remove the circle", "--steps", 1, "--out", tmp_path / "y.png"]
    r = invoke(*args)
    assert r.exit_code == 1 and "100x80 px, the model edits 64x64 images" in r.output and "--resize" in r.output
    assert not (tmp_path / "y.png").exists()
    assert invoke(*args, "--resize").exit_code == 0


@pytest.mark.parametrize("args, message", [
    (["sample", "--model", "{server}", "--prompt", "a purple giraffe", "--out", "x.png"], "'giraffe' is not in"),
    (["sample", "--model", "{tmp}", "--prompt", "a circle", "--out", "x.png"], "not a diffusers model folder"),
    (["sample", "--model", "nowhere", "--prompt", "a circle", "--out", "x.png"], "neither a preset"),
    (["sample", "--model", "sdxl", "--prompt", "a circle", "--out", "x.png"], "needs a text encoder and a codec"),
    (["edit", "--model", "{server}", "--image", "{png}", "--prompt", "remove the circle", "--out", "y.png"],
     "editing needs an in-context model"),
    (["info", "sdxl:{png}"], "expected an existing .safetensors file"),
    (["sample", "--model", "{server}", "--prompt", "a circle", "--flow-shift", "3", "--out", "x.png"],
     "flow_shift: applies to flow-matching models"),
])
def test_bad_model_input_is_one_line(args, message, tiny_folders, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "empty").mkdir()
    subs = {"server": tiny_folders["shapes-server"], "tmp": tmp_path / "empty", "png": tmp_path / "a.png"}
    r = invoke(*[a.format(**subs) for a in args])
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_bench_gen_and_edit_write_benchmark_folders_and_scores(tiny_folders, tmp_path):
    r = invoke("bench", "gen", "--model", tiny_folders["shapes-server"], "--out", tmp_path / "g", "--n-per-tag", 1,
               "--images-per-prompt", 2, "--steps", 2, "--json", tmp_path / "g.json")
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "g.json").read_text())
    assert summary["images"] == 12 and set(summary["per_tag"]) >= {"counting", "position"}
    assert summary["scheduler"] == "ddim" and summary["steps"] == 2  # how it sampled, for comparing benches
    assert len(list((tmp_path / "g").glob("*/samples/0001.png"))) == 6
    r = invoke("bench", "edit", "--model", tiny_folders["shapes-mobile"], "--out", tmp_path / "e", "--n-per-type", 1,
               "--steps", 2)
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "e" / "edited").glob("*.png"))) == 9 and "compose" in r.output
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["scheduler"] == "flow-euler"
