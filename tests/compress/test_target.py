"""Target-architecture pruning (SDXL layout -> DreamLite layout) on tiny configs: the mapping is exact where the
teacher is expressible in the target, importance decides what goes, and the result is a diffusers model folder."""
import json

import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMScheduler

from conftest import TINY, tiny_bundle
from dreamlite.cli import main
from dreamlite.compress.prune.generic import example_inputs
from dreamlite.evaluation.footprint import macs_per_module
from dreamlite.io import DreamliteError
from dreamlite.compress.prune.compensate import calibration_statistics, fold_pruned_inputs
from dreamlite.compress.prune.passes import (DepthPass, Evidence, HeadsPass, MaterializePass, PrunedUNet, WidthPass,
                                             depth, heads, materialize, run_passes, width)
from dreamlite.compress.prune.target import calibration_batches
from dreamlite.compress.prune.unet import Space, StateDictSource, channel_scores, select, skip_scores, teacher_spaces
from dreamlite.models.presets import build, get_preset
from dreamlite.models.teacher import SCHEDULES, clean_of, epsilon_of


def teacher():
    return tiny_bundle("shapes-server").unet


def prune_unet(t, target: dict, evidence=None, passes=None):
    """The student of config ``target`` pruned from the teacher module ``t`` through the whole chain, and the
    per-pass report."""
    return run_passes(PrunedUNet(StateDictSource(t.state_dict()), dict(t.config), target), passes, evidence)


def dreamlite_twin(unet, **changes) -> dict:
    """A DreamLiteUNetModel config: the teacher's own (same widths, depths, embeddings) plus ``changes``."""
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    return {**cfg, "qk_norm": None, "use_sep_conv": False, "ff_mult": 4, "num_kv_heads": None, **changes}


def max_deviation(a, b):
    x = example_inputs(a, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((a(**x).sample - b(**x).sample).abs().max() / a(**x).sample.abs().max())


def test_a_target_equal_to_the_teacher_is_an_exact_copy():
    t = teacher()
    s, report = prune_unet(t, dreamlite_twin(t))
    assert report[-1]["parameters"]["new"] == 0 and report[-1]["parameters"]["fitted"] == 0
    assert max_deviation(t, s) < 1e-6


def test_new_identity_initialised_layers_leave_the_output_unchanged():
    """The teacher plus DreamLite's new stage-1 cross-attention: the new layer starts as the identity."""
    t = teacher()
    blocks = ["CrossAttnDownRemoveSelfAttnBlock2D"] + list(t.config.down_block_types[1:])
    s, report = prune_unet(t, dreamlite_twin(t, down_block_types=blocks, transformer_layers_per_block=[1, 1, 2]))
    report = report[-1]
    assert report["parameters"]["new"] > 0 and max_deviation(t, s) < 1e-6


@torch.no_grad()
def test_separable_convs_and_shared_kv_heads_are_exact_when_the_teacher_is_expressible():
    """Dense convs of rank 1 (expanding) and rank 2 (contracting) per input channel, and identical key/value heads,
    are exactly what the separable conv fit and the multi-query merge can represent: the student must match."""
    t = teacher()
    g = torch.Generator().manual_seed(3)
    for name, p in t.named_parameters():
        if name.endswith(("conv1.weight", "conv2.weight")) and "resnets" in name:
            rank = 1 if "conv1" in name else 2
            o, i = p.shape[:2]
            p.copy_(torch.einsum("oir,irk->oik", torch.randn(o, i, rank, generator=g),
                                 torch.randn(i, rank, 9, generator=g)).view_as(p) / 3)
        if name.endswith("conv2.bias") and "resnets" in name:
            p.zero_()  # a separable conv has no bias and these ResNets no shortcut to fold it into
        if name.endswith(("attn1.to_k.weight", "attn1.to_v.weight", "attn2.to_k.weight", "attn2.to_v.weight")):
            heads = t.get_submodule(name.rsplit(".", 2)[0]).heads
            p.copy_(p.view(heads, -1, p.shape[1])[:1].expand(heads, -1, -1).reshape_as(p))
    s, report = prune_unet(t, dreamlite_twin(t, use_sep_conv=True, num_kv_heads=1))
    report = report[-1]
    assert report["conv1_rank1_fit_error_mean"] < 1e-5 and report["conv2_rank2_fit_error_mean"] < 1e-5
    assert max_deviation(t, s) < 1e-4


def test_shapes_mobile_from_the_server_layout(tmp_path):
    from diffusers import DreamLiteUNetModel
    t = teacher()
    p = get_preset("shapes-mobile")
    macs = macs_per_module(t, (8, 8), (64, 64), 4)
    s, report = prune_unet(t, {**p.config, **TINY["shapes-mobile"]}, Evidence(module_macs=macs))
    kinds = [r["pass"] for r in report]
    assert kinds[0] == "depth" and "width" in kinds and "heads" in kinds and kinds[-1] == "materialize"
    counts = report[-1]["parameters"]
    assert sum(counts.values()) == sum(q.numel() for q in s.parameters()) and counts["inherited"] > counts["new"]
    after = [r["parameters_after"] for r in report]  # each pass's model, from the teacher's size to the student's
    assert sum(q.numel() for q in t.parameters()) > after[0] and after == sorted(after, reverse=True)
    assert after[-1] == sum(q.numel() for q in s.parameters())
    macs_after = [r["macs_after"] for r in report[:-1]]  # materialize's is the caller's (the in-context student)
    assert sum(macs.values()) > macs_after[0] and macs_after == sorted(macs_after, reverse=True)
    # stage 1 gains cross-attention the teacher never had: it starts as the identity
    block = s.down_blocks[0].attentions[0]
    x = torch.randn(1, block.config.in_channels, 4, 4)
    with torch.no_grad():
        y = block(x, encoder_hidden_states=torch.randn(1, 3, s.config.cross_attention_dim)).sample
    assert torch.allclose(x, y)
    s.save_pretrained(tmp_path, safe_serialization=True)
    again = DreamLiteUNetModel.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(s.state_dict().values(), again.state_dict().values()))


def test_a_narrower_time_embedding_is_fitted_with_weights_of_the_teachers_scale():
    """A student whose sinusoid width differs gets its first time layer by a regularised fit: the plain least-squares
    solution cancels weights of ~1e7, which fp32 ONNX, fp16 and int8 all break on."""
    t = teacher()
    p = get_preset("shapes-mobile")
    s, report = prune_unet(t, {**p.config, **TINY["shapes-mobile"], "block_out_channels": [4, 8, 16]})
    notes = report[-1]
    assert 0 < notes["time_embedding_fit_error"] < 1
    fitted, original = s.time_embedding.linear_1.weight, t.time_embedding.linear_1.weight
    assert fitted.shape[1] == 4 and original.shape[1] == 8
    assert fitted.abs().max() < 10 * original.abs().max()


def test_depth_keeps_the_layers_whose_removal_changes_the_output():
    bundle = tiny_bundle("shapes-server")
    t = bundle.unet
    mid = t.mid_block.attentions[0].transformer_blocks
    with torch.no_grad():  # layer 0 of the mid block writes nothing: skipping it changes nothing
        for lin in (mid[0].attn1.to_out[0], mid[0].attn2.to_out[0], mid[0].ff.net[2]):
            lin.weight.zero_()
            lin.bias.zero_()
    batches = [example_inputs(t, 2, torch.Generator().manual_seed(i)) for i in range(2)]
    measured = skip_scores(t, batches)
    assert measured["mid_block.attentions.0"][0] == 0 < measured["mid_block.attentions.0"][1]
    p = get_preset("shapes-mobile")
    model = PrunedUNet(StateDictSource(t.state_dict()), dict(t.config), {**p.config, **TINY["shapes-mobile"]})
    evidence = Evidence(teacher=t, batches=calibration_batches(bundle, 2, 0, batch=2))
    after = depth(model, DepthPass(importance="measured"), evidence)
    assert after.plan.layers["mid_block.attentions.0"] == [1]
    entry = next(e for e in after.plan.report if e["block"] == "mid_block.attentions.0")
    assert entry["criterion"] == "skip-output-change" and entry["scores"][0] == 0


def test_depth_drops_resnet_layers_where_the_skips_still_line_up():
    """A target with one layer per block: each down block drops a layer (not the one that widens the stream), each
    up block one (not the one reading the block below, nor the skip across stages); the result loads and runs."""
    t = teacher()
    s, report = prune_unet(t, dreamlite_twin(t, layers_per_block=1))
    kept = {e["block"]: e["kept"] for e in report if e.get("unit") == "block layer"}
    assert kept["down_blocks.1"] == kept["down_blocks.2"] == [0] and kept["up_blocks.0"] == kept["up_blocks.1"] == [0, 2]
    assert len(kept["down_blocks.0"]) == 1 and kept["up_blocks.2"][0] == 0 and len(kept["up_blocks.2"]) == 2
    assert report[-1]["parameters_after"] == sum(q.numel() for q in s.parameters()) < sum(q.numel() for q in t.parameters())
    assert [len(b.resnets) for b in s.down_blocks] == [1, 1, 1] and [len(b.resnets) for b in s.up_blocks] == [2, 2, 2]
    x = example_inputs(s, 1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(s(**x).sample).all()


@torch.no_grad()
def test_dropping_block_layers_that_are_identities_is_exact():
    """The last stage's second layers made identities in the teacher (the down ResNet and attention write nothing;
    the up ResNet passes its input through and ignores its skip): the student without them is the teacher."""
    t = teacher()
    down, up = t.down_blocks[2], t.up_blocks[0]
    for lin in (down.resnets[1].conv2, down.attentions[1].proj_out, up.resnets[1].conv2, up.attentions[1].proj_out):
        lin.weight.zero_()
        lin.bias.zero_()
    shortcut = up.resnets[1].conv_shortcut
    shortcut.weight.zero_()
    shortcut.bias.zero_()
    shortcut.weight[:, :shortcut.out_channels, 0, 0] = torch.eye(shortcut.out_channels)
    s, report = prune_unet(t, dreamlite_twin(t, layers_per_block=[2, 2, 1]))
    kept = {e["block"]: e["kept"] for e in report if e.get("unit") == "block layer"}
    assert kept == {"down_blocks.2": [0], "up_blocks.0": [0, 2]}
    assert max_deviation(t, s) < 1e-5


def test_a_target_with_more_block_layers_than_the_teacher_is_refused():
    t = teacher()
    with pytest.raises(DreamliteError, match="down_blocks.0: the target has 3 layers, the teacher only 2"):
        prune_unet(t, dreamlite_twin(t, layers_per_block=3))


def test_measured_depth_drops_the_block_layer_that_changes_nothing():
    bundle = tiny_bundle("shapes-server")
    t = bundle.unet
    with torch.no_grad():  # stage 0's first ResNet writes nothing into its residual stream: it is the identity
        t.down_blocks[0].resnets[0].conv2.weight.zero_()
        t.down_blocks[0].resnets[0].conv2.bias.zero_()
    model = PrunedUNet(StateDictSource(t.state_dict()), dict(t.config), dreamlite_twin(t, layers_per_block=1))
    after = depth(model, DepthPass(importance="measured"), Evidence(teacher=t, batches=calibration_batches(
        bundle, 1, 0, batch=2)))
    entry = next(e for e in after.plan.report if e["block"] == "down_blocks.0")
    assert entry["scores"][0] == 0 < entry["scores"][1] and entry["kept"] == [1]
    assert after.plan.blocks["down_blocks.0"] == [1]
    assert next(e for e in after.plan.report if e["block"] == "down_blocks.1")["scores"][0] is None  # cannot go


def test_passes_are_functions_from_model_to_model_and_chain_as_the_recipe_does():
    """Each pass returns a new model and leaves its input as it was; calling them by hand is the recipe's chain."""
    t = teacher()
    p = get_preset("shapes-mobile")

    def start():
        return PrunedUNet(StateDictSource(t.state_dict()), dict(t.config), {**p.config, **TINY["shapes-mobile"]})

    model = start()
    deeper = depth(model, DepthPass(importance="norm"))
    assert model.plan.layers == {} and model.plan.report == [] and deeper.plan.layers
    narrow = width(deeper, WidthPass(importance="magnitude"))
    assert deeper.plan.keep == {} and narrow.plan.keep and all(s.unit == 1 for s in (
        narrow.spaces()[k] for k in narrow.plan.keep))
    fewer = heads(narrow, HeadsPass(importance="random", seed=5))
    assert set(fewer.plan.keep) > set(narrow.plan.keep)
    by_hand = materialize(fewer, MaterializePass())
    assert [e["pass"] for e in fewer.plan.report][-3:] == ["width", "heads", "materialize"]
    chained, report = run_passes(start(), [DepthPass(importance="norm"), WidthPass(importance="magnitude"),
                                           HeadsPass(importance="random", seed=5)])
    assert report == fewer.plan.report
    assert all(torch.equal(a, b) for a, b in zip(by_hand.state_dict().values(), chained.state_dict().values()))
    other = materialize(heads(narrow, HeadsPass(importance="random", seed=6)))
    assert any(not torch.equal(a, b) for a, b in zip(by_hand.state_dict().values(), other.state_dict().values()))


def test_selection_keeps_whole_heads_and_the_same_number_per_group():
    scores = torch.tensor([9., 1, 2, 8, 7, 3, 0, 6])
    assert select(scores, 4, Space(8, groups=2)).tolist() == [0, 3, 4, 7]
    assert select(scores, 4, Space(8, unit=4)).tolist() == [0, 1, 2, 3]
    assert select(scores, 2, Space(8)).tolist() == [0, 3]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_prunes_a_folder_to_a_config_file_and_the_result_samples(tiny_folders, tmp_path):
    p = get_preset("shapes-mobile")
    config = tmp_path / "mobile.json"
    config.write_text(json.dumps({**p.config, **TINY["shapes-mobile"], "_class_name": "DreamLiteUNetModel"}))
    r = invoke("prune", "--teacher", tiny_folders["shapes-server"], "--target", config, "--calib", 1,
               "--importance", "taylor", "--out", tmp_path / "student")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "student" / "dreamlite.json").read_text())
    assert meta["pruning"]["importance"] == "taylor" and "relative_output_deviation" in meta["pruning"]
    assert meta["pruning"]["relative_output_deviation_held_out"] > 0 and "held out" in r.output
    # untrained, it still predicts what its teacher predicts, on the teacher's schedule
    assert meta["prediction"] == "epsilon" and meta["schedule"] == "sdxl" and meta["in_context"]
    r = invoke("sample", "--model", tmp_path / "student", "--prompt", "a red circle", "--steps", 2,
               "--out", tmp_path / "x.png")
    assert r.exit_code == 0, r.output


def test_a_parameter_budget_picks_the_largest_dreamlite_layout_that_fits(tiny_folders, tmp_path):
    from diffusers import DreamLiteUNetModel
    from dreamlite.compress.prune.budget import dreamlite_layout, parse_count
    assert parse_count("0.39B", "p") == 390_000_000 and parse_count("1.4t", "m") == 1_400_000_000_000
    full = sum(q.numel() for q in build(dreamlite_layout(dict(teacher().config), 1.0), "DreamLiteUNetModel",
                                        "meta").parameters())
    r = invoke("prune", "--teacher", tiny_folders["shapes-server"], "--params", int(full * 0.6), "--calib", 0,
               "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    target = json.loads((tmp_path / "s" / "dreamlite.json").read_text())["pruning"]["target"]
    n = sum(q.numel() for q in DreamLiteUNetModel.from_pretrained(tmp_path / "s").parameters())
    assert n == target["parameters"] <= full * 0.6 and target["factor"] < 1


@pytest.mark.parametrize("latent", [4, 48])
def test_budget_layouts_keep_stage_one_wider_than_the_latent(latent):
    from dreamlite.compress.prune.budget import dreamlite_layout
    cfg = dict(teacher().config)
    cfg.update(in_channels=latent, out_channels=latent, block_out_channels=[128, 128, 128], attention_head_dim=8)
    widths = dreamlite_layout(cfg, 1e-6)["block_out_channels"]
    assert widths[0] >= 4 / 3 * latent and widths[0] % cfg["norm_num_groups"] == 0


@pytest.mark.parametrize("args, message", [
    (["--target", "sdxl"], "is a UNet2DConditionModel; targets are DreamLiteUNetModel"),
    (["--target", "shapes-mobile", "--width", "0.5"], "exactly one of --target"),
    (["--params", "12X"], "--params: '12X' is not a count"),
    (["--params", "10"], "the smallest DreamLite layout of this teacher needs"),
    (["--target", "nowhere.json"], "neither a DreamLite preset nor a config file"),
    (["--target", "shapes-mobile"], "[64, 64, 64] do not fit inside the teacher's [8, 16, 16]"),
    (["--target", "shapes-mobile", "--importance", "activation", "--calib", "0"], "needs calibration batches"),
])
def test_bad_target_input_is_one_line(args, message, tiny_folders, tmp_path):
    r = invoke("prune", "--teacher", tiny_folders["shapes-server"], *args, "--out", tmp_path / "o")
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kernel", [None, 3])
def test_folding_pruned_inputs_is_exact_when_they_are_affine_in_the_kept_ones(kernel):
    g = torch.Generator().manual_seed(0)
    kept = torch.randn(4000, 5, generator=g)
    mix = torch.randn(5, 3, generator=g)
    x = torch.cat([kept, kept @ mix + 0.5], 1)[:, torch.tensor([0, 5, 1, 6, 2, 3, 7, 4])]  # removed: 1, 3, 6
    keep = torch.tensor([0, 2, 4, 5, 7])
    z = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    moments = z.T @ z / len(z)
    if kernel is None:
        layer = torch.nn.Linear(8, 4)
        w, b = fold_pruned_inputs(layer.weight.data, keep, moments, ridge=0.0)
        small = torch.nn.Linear(5, 4)
        small.weight.data, small.bias.data = w, layer.bias.data + b
        with torch.no_grad():
            assert torch.allclose(small(x[:, keep]), layer(x), atol=1e-4)
    else:  # the same channels at every pixel of a map; exact away from the zero-padded border
        maps = x[:64].T.reshape(1, 8, 8, 8)
        layer = torch.nn.Conv2d(8, 4, kernel, padding=1)
        w, b = fold_pruned_inputs(layer.weight.data, keep, moments, ridge=0.0)
        small = torch.nn.Conv2d(5, 4, kernel, padding=1)
        small.weight.data, small.bias.data = w, layer.bias.data + b
        with torch.no_grad():
            want, got = layer(maps), small(maps[:, keep])
        assert torch.allclose(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1], atol=1e-4)
    assert not torch.allclose(layer.weight.data.index_select(1, keep), w)  # the fold did change the kept weights


def test_calibration_folds_nothing_when_nothing_is_pruned():
    t = teacher()
    x = example_inputs(t, 2, torch.Generator().manual_seed(0))
    calib = calibration_statistics(t, [x])
    assert "conv_out" in calib.inputs and calib.inputs["conv_out"].shape == (t.conv_out.in_channels + 1,) * 2
    s, _ = prune_unet(t, dreamlite_twin(t), Evidence(statistics=calib))
    assert max_deviation(t, s) == 0


def test_taylor_without_calibration_saliency_is_refused_not_silently_zero():
    t = teacher()
    with pytest.raises(DreamliteError, match="passes.width: importance 'taylor' needs calibration batches"):
        prune_unet(t, dreamlite_twin(t), passes=[WidthPass(importance="taylor")])
    with pytest.raises(DreamliteError, match="'taylor' needs the saliency"):
        channel_scores(StateDictSource(t.state_dict()), dict(t.config), teacher_spaces(
            StateDictSource(t.state_dict()), dict(t.config)), "taylor")


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_calibration_targets_are_what_the_teacher_predicts(prediction):
    """Taylor importance takes the teacher's own training loss: the noise for epsilon, the velocity for v."""
    bundle = tiny_bundle("shapes-server")
    bundle.prediction = prediction
    b = calibration_batches(bundle, 1, 0, batch=2)[0]
    a = DDPMScheduler.from_config(SCHEDULES[bundle.schedule]).alphas_cumprod[b["timestep"]].view(-1, 1, 1, 1)
    eps = epsilon_of(b["target"], b["sample"], a, prediction)
    x0 = clean_of(eps, b["sample"], a)
    assert x0.min() >= -1 - 1e-3 and x0.max() <= 1 + 1e-3  # the rendered image comes back: the target is consistent
    assert prediction == "v" or torch.equal(b["target"], eps)
