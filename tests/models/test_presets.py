import pytest
import torch

from dreamlite.evaluation.footprint import footprint, parameters
from dreamlite.models.bundle import from_preset, load_bundle
from dreamlite.models.presets import PRESETS, build_preset

# Parameter counts of the released configs (../shared/ANCHORS.md).
KNOWN = {"sdxl": 2_567_463_684, "sd15": 859_520_964, "dreamlite-0.39b": 389_968_388}


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_on_meta_without_weights(name):
    model = build_preset(name, "meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    if name in KNOWN:
        assert parameters(model) == KNOWN[name]


def test_mobile_is_the_dreamlite_layout_at_a_sixth_of_the_server():
    server, mobile = from_preset("shapes-server", "meta"), from_preset("shapes-mobile", "meta")
    ratio = parameters(mobile.unet) / parameters(server.unet)
    assert 0.12 <= ratio <= 0.20
    assert type(mobile.unet).__name__ == "DreamLiteUNetModel" and mobile.in_context and mobile.prediction == "flow"
    assert server.unet.config.addition_embed_type == "text_time" and server.prediction == "epsilon"


@pytest.mark.parametrize("name", ["shapes-server", "shapes-mobile"])
def test_first_stage_is_wide_enough_to_carry_the_noise(name):
    # An epsilon / velocity predictor must pass every latent channel's noise through stage 1.
    config = PRESETS[name].config
    assert config["block_out_channels"][0] >= config["in_channels"]


def test_footprint_of_the_real_models_counts_macs_on_meta():
    sdxl = footprint(load_bundle("sdxl", meta=True))
    lite = footprint(load_bundle("dreamlite-0.39b", meta=True))
    assert sdxl["parameters"] == KNOWN["sdxl"] and lite["latent"] == [4, 128, 256]
    # DreamLite's in-context call at 1024 px costs well under half of SDXL's plain call.
    assert 0.2 < lite["macs_per_call"] / sdxl["macs_per_call"] < 0.5


def test_weights_file_loads_into_its_preset(tmp_path, tiny_server):
    from safetensors.torch import save_file
    b = from_preset("shapes-mobile")
    save_file({k: v.contiguous() for k, v in b.unet.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = load_bundle(f"shapes-mobile:{tmp_path / 'w.safetensors'}")
    assert torch.equal(loaded.unet.conv_in.weight, b.unet.conv_in.weight)
