"""The sparse co-activation counter (graphs.pair_counter): counts against a dense codeᵀ·code,
across batches, shards, budgets and a checkpoint."""

from __future__ import annotations

import pytest
import torch

from graphs.pair_counter import CoactivationCounter
from sae.sae import SparseCode
from tests.graphs.coactivation_reference import (
    assert_same_counts,
    dense_reference,
    random_code,
    split_rows,
)


@pytest.mark.parametrize(
    ("n_latents", "budget"),
    [
        (40, 1 << 24),
        (40, 5),
        (60_000, 1 << 24),
    ],  # plain; pairs built a few rows at a time; int64 keys
)
def test_counts_match_a_dense_reference(n_latents: int, budget: int) -> None:
    code = random_code(n_rows=300, n_latents=n_latents, max_active=12, seed=n_latents + budget)
    counter = CoactivationCounter(n_latents, n_shards=4)
    for part in split_rows(code, 37):  # many batches: runs are merged across batches and shards
        counter.add(part, budget=budget)
    stats = counter.stats()
    assert stats.n_tokens == 300
    assert_same_counts(stats, *dense_reference(code, n_latents))
    assert (stats.pair_index[0] < stats.pair_index[1]).all()


def test_checkpointed_counter_state_resumes_exactly() -> None:
    code = random_code(n_rows=200, n_latents=30, max_active=9, seed=7)
    parts = split_rows(code, 50)
    first = CoactivationCounter(30)
    for part in parts[:2]:
        first.add(part, n_uncounted=1)
    resumed = CoactivationCounter(30)
    resumed.load_state_dict(first.state_dict(), first.n_tokens)
    for part in parts[2:]:
        resumed.add(part, n_uncounted=1)
    stats = resumed.stats()
    assert stats.n_tokens == 200 - 4  # one uncounted (passthrough) row per batch
    assert_same_counts(stats, *dense_reference(code, 30))


def dense_miss_reference(
    code: SparseCode, missed: SparseCode, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(miss_counts [n], miss_index [2, Q], miss_pair_counts [Q]) from dense bool codes: Dᵀ·M."""
    on, miss = [(c.to_dense(n) > 0).long() for c in (code, missed)]  # [N, n] each
    co = on.T @ miss  # [n, n]: fired i, missed j
    i, j = co.nonzero(as_tuple=True)  # row-major: sorted by (i, j)
    return miss.sum(0), torch.stack([i, j]), co[i, j]


@pytest.mark.parametrize("budget", [1 << 24, 5])
def test_miss_counts_match_a_dense_reference(budget: int) -> None:
    n = 40
    code = random_code(n_rows=300, n_latents=n, max_active=10, seed=1)
    # overlaps with code: allowed here
    missed = random_code(n_rows=300, n_latents=n, max_active=6, seed=2)
    counter = CoactivationCounter(n, n_shards=4, residual=True)
    for part, miss_part in zip(split_rows(code, 37), split_rows(missed, 37), strict=True):
        counter.add(part, missed=miss_part, budget=budget)
    stats = counter.stats()
    assert_same_counts(stats, *dense_reference(code, n))  # the co-activation counts are unchanged
    miss_counts, miss_index, miss_pair_counts = dense_miss_reference(code, missed, n)
    assert stats.miss_counts.equal(miss_counts) and stats.miss_index.equal(miss_index)
    assert stats.miss_pair_counts.equal(miss_pair_counts)
    resumed = CoactivationCounter(n, residual=True)  # a checkpoint carries the miss counts
    resumed.load_state_dict(counter.state_dict(), counter.n_tokens)
    assert resumed.stats().miss_pair_counts.equal(miss_pair_counts)
    with pytest.raises(ValueError, match="missed code exactly when"):
        counter.add(code)
    with pytest.raises(ValueError, match="missed code exactly when"):
        CoactivationCounter(n).add(code, missed=missed)
    with pytest.raises(ValueError, match="residual setting differs"):
        CoactivationCounter(n).load_state_dict(counter.state_dict(), counter.n_tokens)
