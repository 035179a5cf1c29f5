"""Reference values computed by hand pin every metric definition."""

from __future__ import annotations

import math

import pytest
import torch

from sae import metrics


def test_l0_counts_nonzero_latents_per_token() -> None:
    acts = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.5]])
    assert metrics.l0(acts) == pytest.approx(1.5)  # (2 + 1) / 2


def test_fvu_and_explained_variance_by_hand() -> None:
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # mean (2, 1); Σ‖x − mean‖² = 1+1+1+1 = 4
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 2.0]])  # Σ‖x − x̂‖² = 1 + 1 = 2
    assert metrics.fvu(x, x_hat) == pytest.approx(0.5)
    assert metrics.explained_variance(x, x_hat) == pytest.approx(0.5)
    assert metrics.mse(x, x_hat) == pytest.approx(2 / 4)
    assert metrics.fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)  # predicting the mean


def test_streaming_accumulator_equals_the_one_shot_definitions() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 8, generator=g) * 50 + 300  # large mean: cancellation must not bite
    x_hat = x + torch.randn(100, 8, generator=g)
    acc = metrics.FVUAccumulator(8)
    for i in range(0, 100, 30):
        acc.update(x[i : i + 30], x_hat[i : i + 30], n_active=3 * len(x[i : i + 30]))
    result = acc.result()
    assert result["fvu"] == pytest.approx(metrics.fvu(x, x_hat), rel=1e-9)
    assert result["mse"] == pytest.approx(metrics.mse(x, x_hat), rel=1e-9)
    assert result["l0"] == 3.0


def test_dead_and_dense_fractions() -> None:
    since = torch.tensor([0, 10, 100, 1000])
    assert metrics.dead_fraction(since, window=100) == 0.5  # 100 and 1000 tokens silent
    counts = torch.tensor([0, 5, 11, 50])
    assert metrics.dense_fraction(counts, n_tokens=100) == 0.5  # 11% and 50% are > 10%


def test_ce_loss_recovered_and_kl_by_hand() -> None:
    assert metrics.ce_loss_recovered(ce_clean=2.0, ce_spliced=2.5, ce_zero=7.0) == pytest.approx(
        0.9
    )
    p = torch.tensor([[math.log(0.5), math.log(0.5)]])
    q = torch.tensor([[math.log(0.25), math.log(0.75)]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert metrics.kl_divergence(p, q) == pytest.approx(expected)
    assert metrics.kl_divergence(p, p) == pytest.approx(0.0)
