"""The one logistic-regression fit: standardise → full-batch L-BFGS → fold back.

Probes (`probes.fit`) and the first-letter evaluation (`graphs.eval.letters`) both fit linear
classifiers on activations or SAE codes; this is their shared fit, kept in `graphs` because the
layering (sae ← graphs ← probes) lets both reach it here.

    fit_logistic(x, y, l2)   w, b minimising BCE(pool(z·w + b), y) + l2‖w‖², z = (x − mean) / std
    Logistic.predict(x)      the fitted classifier on raw x
    Logistic.folded()        (w_raw, b_raw) with x·w_raw + b_raw = z·w + b: a probe that reads raw x

Why standardise: L-BFGS converges in a few dozen steps on standardised features whatever the
inputs' scale (residual norms reach the thousands). The fit runs in x's dtype, so a caller picks
float64 for calibrated probes or float32 for many quick fits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Logistic(NamedTuple):
    mean: Tensor  # [f] training mean of each feature
    std: Tensor  # [f] its standard deviation (1 for a constant feature)
    w: Tensor  # [f] weights on the standardised features
    b: Tensor  # [] bias

    def logits(self, x: Tensor) -> Tensor:  # [n, f] -> [n]
        return ((x - self.mean) / self.std) @ self.w + self.b

    def predict(self, x: Tensor) -> Tensor:  # [n, f] -> [n] bool
        return self.logits(x) > 0

    def folded(self) -> tuple[Tensor, Tensor]:
        """(w_raw [f], b_raw []): the same classifier on raw features."""
        return self.w / self.std, self.b - (self.mean / self.std * self.w).sum()


def fit_logistic(
    x: Tensor,
    y: Tensor,
    l2: float,
    max_iter: int = 100,
    correction: int = 0,
    pool: Callable[[Tensor], Tensor] | None = None,
) -> Logistic:
    """Fit on rows x [n, f] (in x's dtype) to binary labels y [m].

    correction: Bessel's correction of the std (0: population std, 1: sample std), as in
    `torch.std`. pool: maps the row logits [n] to one logit per label [m] (e.g. the max over each
    text's tokens); without it m = n. The L2 penalty keeps separable tasks finite.
    """
    mean, std = x.mean(0), x.std(0, correction=correction)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # a constant column stays constant
    z, target = (x - mean) / std, y.to(x.dtype)  # [n, f], [m]
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros((), dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = z @ w + b  # [n]
        logits = logits if pool is None else pool(logits)  # [m]
        loss = F.binary_cross_entropy_with_logits(logits, target) + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return Logistic(mean, std, w.detach(), b.detach())
