"""The generic width-pruning API on other models (tiny configs): 50% width, forward runs, save and reload without
pickle give identical outputs."""
import pytest
import torch

from dreamlite.compress.prune import CRITERIA, load_pruned, prune_width, save_pruned
from dreamlite.io import DreamliteError


def _unet_inputs(cross, text_time=False):
    inputs = {"sample": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([10.0, 500.0]),
              "encoder_hidden_states": torch.randn(2, 5, cross)}
    if text_time:
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 16), "time_ids": torch.randn(2, 6)}
    return inputs


def sd15():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(sample_size=8, block_out_channels=[16, 32, 32, 32], layers_per_block=1,
                                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, attention_head_dim=2,
                                cross_attention_dim=8, norm_num_groups=4), _unet_inputs(8)


def sd21():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(sample_size=8, block_out_channels=[16, 32, 32, 32], layers_per_block=1,
                                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, attention_head_dim=[1, 2, 2, 2],
                                cross_attention_dim=8, norm_num_groups=4, use_linear_projection=True,
                                upcast_attention=True), _unet_inputs(8)


def sdxl():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(sample_size=8, block_out_channels=[16, 32, 32], layers_per_block=1,
                                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                                transformer_layers_per_block=[1, 1, 2], attention_head_dim=[1, 2, 2],
                                cross_attention_dim=8, use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 24,
                                norm_num_groups=4), _unet_inputs(8, text_time=True)


def unet2d():
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8), {"sample": torch.randn(2, 3, 8, 8),
                                                                   "timestep": torch.tensor([3.0, 7.0])}


def vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                         layers_per_block=1), {"sample": torch.randn(2, 3, 16, 16), "sample_posterior": False}


def clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel
    config = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1)
    return CLIPTextModel(config), {"input_ids": torch.randint(2, 100, (2, 7))}


def vit():
    from transformers import ViTConfig, ViTModel
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4)
    return ViTModel(config), {"pixel_values": torch.randn(2, 3, 16, 16)}


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.GELU(),
                               torch.nn.Linear(32, 3)), (torch.randn(4, 6),)


def _out(model, inputs):
    from dreamlite.compress.prune.width import run, tensors
    with torch.no_grad():
        return tensors(run(model, inputs))[0]


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("make", [sd15, sd21, sdxl, unet2d, vae, clip_text, vit], ids=lambda f: f.__name__)
def test_half_width_then_reload_gives_identical_outputs(make, tmp_path):
    torch.manual_seed(0)
    model, inputs = make()
    model.eval()
    before, shape = _params(model), _out(model, inputs).shape
    history = prune_width(model, 0.5, inputs)
    out = _out(model, inputs)
    if make not in (clip_text, vit):  # diffusers interface layers keep their width; encoders get half the width
        assert out.shape == shape
    assert 0.2 < _params(model) / before < 0.4  # ~ a quarter of the weights left at half width
    save_pruned(model, history, tmp_path / "p")
    assert not list(tmp_path.glob("p/*.bin")) and not list(tmp_path.glob("p/*.pt"))
    reloaded = load_pruned(tmp_path / "p", inputs)
    assert torch.equal(_out(reloaded, inputs), out)


def test_any_module_with_its_base_model(tmp_path):
    torch.manual_seed(0)
    model, inputs = mlp()
    history = prune_width(model, 0.5, inputs, importance="magnitude",
                          plan=__import__("dreamlite.compress.prune", fromlist=["WidthPlan"]).WidthPlan(
                              ignored=[model[4]]))
    assert model[0].out_features == 16 and model[4].out_features == 3
    save_pruned(model, history, tmp_path / "p")
    with pytest.raises(DreamliteError, match="pass the base model"):
        load_pruned(tmp_path / "p", inputs)
    torch.manual_seed(1)
    base, _ = mlp()
    assert torch.equal(_out(load_pruned(tmp_path / "p", inputs, base), inputs), _out(model, inputs))


@pytest.mark.parametrize("importance", CRITERIA)
def test_every_criterion_prunes(importance):
    torch.manual_seed(0)
    model, inputs = sdxl()
    loop = lambda m: m(**inputs).sample.pow(2).mean()  # noqa: E731
    prune_width(model, 0.25, inputs, importance, calibration=loop)
    assert _out(model, inputs).shape == (2, 4, 8, 8)


def test_criteria_choose_differently():
    picks = {}
    for importance in ("magnitude", "random"):
        torch.manual_seed(0)
        model, inputs = mlp()
        prune_width(model, 0.5, inputs, importance)
        picks[importance] = model[0].weight.detach().clone()
    assert not torch.equal(picks["magnitude"], picks["random"])


def test_a_registered_criterion_is_used_by_name(monkeypatch):
    import torch_pruning as tp
    from dreamlite.compress.prune import importance as registry

    monkeypatch.setattr(registry, "FACTORIES", dict(registry.FACTORIES))  # the test's registration does not leak
    calls = []

    @registry.criterion("first-channels")  # keeps the lowest-index channels: score falls with the index
    class FirstChannels(tp.importance.MagnitudeImportance):
        def __call__(self, group):
            calls.append(len(group))
            n = len(group[0][1])
            return torch.arange(n, 0, -1).float()

    torch.manual_seed(0)
    model, inputs = mlp()
    kept = model[0].weight.detach().clone()
    prune_width(model, 0.5, inputs, "first-channels")
    assert calls and torch.equal(model[0].weight, kept[: model[0].weight.shape[0]])


def test_bad_input():
    model, inputs = mlp()
    with pytest.raises(DreamliteError, match="ratio 1.5"):
        prune_width(model, 1.5, inputs)
    with pytest.raises(DreamliteError, match="unknown criterion 'psychic'"):
        prune_width(model, 0.5, inputs, importance="psychic")
    with pytest.raises(DreamliteError, match="needs calibration batches"):
        prune_width(model, 0.5, inputs, importance="taylor")
    with pytest.raises(DreamliteError, match="Sequential: cannot trace"):
        prune_width(model, 0.5, (torch.randn(4, 7),))


def test_prune_cli_on_a_diffusers_folder(tmp_path):
    import json
    from click.testing import CliRunner
    from dreamlite.cli import main
    from dreamlite.compress.prune.generic import example_inputs, reload
    from dreamlite.compress.prune.width import run

    torch.manual_seed(0)
    model, _ = sdxl()
    model.save_pretrained(tmp_path / "teacher")
    r = CliRunner().invoke(main, ["prune", "--teacher", str(tmp_path / "teacher"), "--width", "0.5", "--importance",
                                  "taylor", "--out", str(tmp_path / "half")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "half" / "dreamlite.json").read_text())
    assert report["parameters_after"] < 0.4 * report["parameters_before"] and report["relative_output_deviation"] > 0
    pruned = reload(tmp_path / "half")
    inputs = example_inputs(pruned, 1, torch.Generator().manual_seed(3))
    assert run(pruned, inputs).sample.shape == (1, 4, 8, 8)
    r = CliRunner().invoke(main, ["prune", "--teacher", str(tmp_path), "--width", "0.5", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "not a diffusers model folder" in r.output and not (tmp_path / "x").exists()
