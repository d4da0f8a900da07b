"""Linear probes: what a layer's features tell, read by a fresh multinomial logistic regression (Alain & Bengio 2016).

Cross-attention and the layers after a feature read it through linear maps, so what a linear probe cannot read from
a feature, the next layer cannot use without first computing it."""
from __future__ import annotations

import torch


def linear_probe(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                 l2: float = 1e-4, iterations: int = 500) -> float:
    """Held-out accuracy of an L2-regularised logistic regression fitted by LBFGS on standardised features.

    ``train`` and ``test`` are (features (N, D), integer labels (N,)); returns the fraction of ``test`` predicted."""
    (x, y), (xt, yt) = train, test
    x, xt = x.float(), xt.float()
    mean, std = x.mean(0), x.std(0) + 1e-6
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], int(max(y.max(), yt.max())) + 1)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin((x - mean) / std), y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return (lin((xt - mean) / std).argmax(1) == yt).float().mean().item()
