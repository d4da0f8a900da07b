import torch

from dreamlite.evaluation.probe import linear_probe


def test_a_probe_reads_what_is_linearly_there_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(600, 8, generator=g), torch.randn(200, 8, generator=g)
    label = lambda f: (f[:, 2] > 0).long() + 2 * (f[:, 5] > 0.5).long()  # four classes, two features decide
    assert linear_probe((x, label(x)), (xt, label(xt))) > 0.97
    noise = torch.randint(0, 4, (600,), generator=g), torch.randint(0, 4, (200,), generator=g)
    assert linear_probe((x, noise[0]), (xt, noise[1])) < 0.4  # chance is 0.25
