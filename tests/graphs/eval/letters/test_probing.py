"""Sparse and dense probes (graphs.eval.letters.probing)."""

from __future__ import annotations

import pytest
import torch

from graphs.eval.letters import (
    dense_probe_accuracy,
    sparse_probe_accuracy,
)
from tests.graphs.eval.letters.conftest import (
    TASK_LETTERS,
    D,
    N,
    indicator_codes,
    letter_task,
    noise_codes,
    to_sparse,
)


def test_sparse_probe_finds_the_indicator_latent_and_is_chance_on_noise() -> None:
    data = letter_task()
    perfect = sparse_probe_accuracy(indicator_codes(data.labels), data.labels, TASK_LETTERS)
    assert set(perfect) == {1, 2, 5}
    assert all(acc > 0.99 for acc in perfect.values()), perfect
    noise = sparse_probe_accuracy(noise_codes(), data.labels, TASK_LETTERS)
    assert all(abs(acc - 0.5) < 0.07 for acc in noise.values()), noise


def test_sparse_probe_same_for_dense_and_sparse_codes_and_deterministic() -> None:
    data = letter_task()
    codes = indicator_codes(data.labels)
    codes[:, 10] *= torch.rand(N) < 0.6  # an imperfect main latent, so accuracies are not all 1
    kwargs = dict(ks=(1, 2, 5), groups=data.token_ids)
    dense = sparse_probe_accuracy(codes, data.labels, TASK_LETTERS, **kwargs)
    sparse = sparse_probe_accuracy(to_sparse(codes), data.labels, TASK_LETTERS, **kwargs)
    assert dense == pytest.approx(sparse, abs=1e-6)
    assert dense == sparse_probe_accuracy(codes, data.labels, TASK_LETTERS, **kwargs)
    assert dense[1] < 0.95  # the weakened latent shows up ...
    assert dense[5] > dense[1]  # ... and |diff| also picks the other letters' indicators


def test_dense_probe_separates_clusters_and_not_noise() -> None:
    data = letter_task()
    assert dense_probe_accuracy(data.x, data.labels, TASK_LETTERS, groups=data.token_ids) > 0.97
    noise = torch.randn(N, D, generator=torch.Generator().manual_seed(7))
    assert abs(dense_probe_accuracy(noise, data.labels, TASK_LETTERS) - 0.5) < 0.07
