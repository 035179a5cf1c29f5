"""The shared logistic fit (graphs.logistic): folding back, constant columns, pooled labels."""

from __future__ import annotations

import torch

from graphs.logistic import fit_logistic


def _planted(n: int = 400, f: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, generator=g) < 0.5  # [n]
    x = 50 * torch.randn(n, f, dtype=torch.float64, generator=g) + 300  # far from standardised
    x[:, 0] += 400 * y
    return x, y


def test_folded_weights_read_raw_features() -> None:
    x, y = _planted()
    fit = fit_logistic(x, y, l2=1e-3)
    w_raw, b_raw = fit.folded()
    assert torch.allclose(x @ w_raw + b_raw, fit.logits(x), atol=1e-8)
    assert (fit.predict(x) == y).float().mean() > 0.9
    assert fit.w.abs().argmax() == 0


def test_constant_column_gets_no_weight_and_no_nan() -> None:
    x, y = _planted()
    x[:, 2] = 7.0
    fit = fit_logistic(x, y, l2=1e-3)
    assert fit.std[2] == 1 and torch.isfinite(fit.w).all() and fit.w[2] == 0


def test_dtype_follows_x_and_correction_is_the_std_estimator() -> None:
    x, y = _planted()
    fit32 = fit_logistic(x.float(), y, l2=1e-3, correction=1)
    assert fit32.w.dtype == torch.float32 and torch.allclose(fit32.std, x.float().std(0))
    assert torch.allclose(fit_logistic(x, y, 1e-3).std, x.std(0, correction=0))


def test_pool_fits_one_label_per_group() -> None:
    """Groups of 4 rows, labelled by their max: the fit goes through the pool."""
    x = 50 * torch.randn(400, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(100, dtype=torch.bool)
    y[::2] = True
    x[::4, 0] += 400 * y.double()  # one row per positive group carries the signal

    def group_max(logits: torch.Tensor) -> torch.Tensor:  # [400] -> [100]
        return logits.view(100, 4).amax(1)

    fit = fit_logistic(x, y, l2=1e-3, pool=group_max)
    assert (group_max(fit.logits(x)) > 0).eq(y).float().mean() > 0.9
