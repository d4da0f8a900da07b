import warnings

import pytest
from click.testing import CliRunner

import dreamlite.precision
from dreamlite.cli import main
from dreamlite.io import DreamliteWarning
from dreamlite.models.sampler import SamplerSettings, generate
from dreamlite.train import TrainSettings, fit


@pytest.fixture
def emulated_bf16(monkeypatch):
    """A CPU without native bf16 kernels, whatever this one has."""
    monkeypatch.setattr(dreamlite.precision, "bf16_is_native", lambda device_type: device_type != "cpu")


def own_warnings(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, DreamliteWarning)]


def test_bf16_sampling_on_a_cpu_that_emulates_it_warns_once_per_call(emulated_bf16, tiny_server):
    bf16 = own_warnings(lambda: generate(tiny_server, ["a circle"], SamplerSettings(steps=1, precision="bf16")))
    fp32 = own_warnings(lambda: generate(tiny_server, ["a circle"], SamplerSettings(steps=1)))
    assert len(bf16) == 1 and bf16[0].startswith("precision: bf16 on this CPU is emulated") and fp32 == []


def test_no_warning_where_bf16_is_native(monkeypatch, tiny_server):
    monkeypatch.setattr(dreamlite.precision, "bf16_is_native", lambda device_type: True)
    assert own_warnings(lambda: generate(tiny_server, ["a circle"], SamplerSettings(steps=1, precision="bf16"))) == []
    assert dreamlite.precision.bf16_is_native("cuda")


def test_bf16_training_on_a_cpu_that_emulates_it_names_the_field(emulated_bf16, tmp_path):
    from tiny_fit import Tiny, batches
    settings = TrainSettings(steps=1, batch=8, lr=1e-2, warmup=0, precision="bf16", checkpoint_every=1, log_every=1)
    caught = own_warnings(lambda: fit(Tiny(), batches, settings, tmp_path, log=lambda m: None))
    assert len(caught) == 1 and caught[0].startswith("train.precision: bf16")


def test_the_cli_prints_the_warning_as_one_line_and_still_samples(emulated_bf16, tiny_folders, tmp_path):
    r = CliRunner().invoke(main, ["sample", "--model", str(tiny_folders["shapes-server"]), "--prompt", "a circle",
                                  "--steps", "1", "--precision", "bf16", "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if "bf16" in line]
    assert lines == [lines[0]] and lines[0].startswith("Warning: precision: bf16") and (tmp_path / "x.png").exists()


def test_training_phases_may_change_precision_within_one_process(tmp_path):
    import torch

    from tiny_fit import Tiny, batches

    class Recording(Tiny):  # the dtype its first layer computes in, per forward
        seen: list = []

        def forward(self, x, y):
            self.seen.append(self.layers[0](x).dtype)
            return super().forward(x, y)

    for i, precision in enumerate(("fp32", "bf16", "fp32")):  # Accelerate's own mixed_precision is fixed per process
        task, Recording.seen = Recording(), []
        settings = TrainSettings(steps=2, batch=8, lr=1e-2, warmup=0, precision=precision, log_every=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DreamliteWarning)
            summary = fit(task, batches, settings, tmp_path / str(i), log=lambda m: None)
        want = torch.bfloat16 if precision == "bf16" else torch.float32
        assert set(Recording.seen) == {want} and summary["final_loss"] > 0
