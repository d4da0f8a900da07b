"""Compensation of pruned channels from calibration statistics: folded inputs and renormalised GroupNorms."""
import torch

from dreamlite.compress.prune.compensate import calibration_statistics, renormalize


def _groupnorm_inputs(samples=1):
    """(samples, 16, 6, 6) with one dominant channel in every group of 4, as the shapes teacher's last up stage."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 16, 6, 6, generator=g) + torch.randn(1, 16, 1, 1, generator=g)
    x[:, ::4] *= 6.0
    return x


def _stats(norm, x):
    return calibration_statistics(torch.nn.Sequential(norm), [{"input": x}]).norms["0"]


def test_a_renormalized_groupnorm_outputs_what_the_full_one_did_on_its_kept_channels():
    full = torch.nn.GroupNorm(4, 16)
    torch.nn.init.normal_(full.weight), torch.nn.init.normal_(full.bias)
    x = _groupnorm_inputs()
    keep = torch.tensor([0, 1, 2, 5, 6, 7, 8, 9, 11, 13, 14, 15])  # 3 per group; two groups lose their dominant one
    small = torch.nn.GroupNorm(4, 12)
    with torch.no_grad():
        want = full(x)[:, keep]
        small.weight.copy_(full.weight[keep]), small.bias.copy_(full.bias[keep])
        sliced = small(x[:, keep])
        small.weight[:], small.bias[:] = renormalize(full.weight, full.bias, keep, _stats(full, x))
        got = small(x[:, keep])
    assert torch.allclose(got, want, atol=1e-4)
    assert (sliced - want).abs().max() > 1.0  # slicing alone rescales the groups that lost their dominant channel


def test_renormalizing_with_nothing_removed_changes_nothing():
    full = torch.nn.GroupNorm(4, 16)
    torch.nn.init.normal_(full.weight), torch.nn.init.normal_(full.bias)
    x = _groupnorm_inputs(samples=3)
    w, b = renormalize(full.weight.data, full.bias.data, torch.arange(16), _stats(full, x))
    assert torch.allclose(w, full.weight.data) and torch.allclose(b, full.bias.data)


def test_calibration_records_every_groupnorm_per_sample():
    norm = torch.nn.GroupNorm(4, 16, eps=1e-6)
    stats = _stats(norm, _groupnorm_inputs(samples=3))
    assert stats["groups"] == 4 and stats["eps"] == 1e-6
    assert stats["mean"].shape == stats["sq"].shape == (3, 16)
