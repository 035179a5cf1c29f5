"""Dense references and random codes the co-activation tests compare against."""

from __future__ import annotations

import torch

from graphs.coactivation_scores import CoactivationStats
from sae.sae import SparseCode


def dense_reference(
    code: SparseCode, n_latents: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(feature_counts [n], pair_index [2, P], pair_counts [P]) from a dense bool code D: DᵀD."""
    fired = code.values > 0
    # sorted; keeps D small for huge n
    used, compact = torch.unique(code.cols[fired], return_inverse=True)
    dense = torch.zeros(code.n_rows, len(used), dtype=torch.int64)  # [N, u]
    dense[code.rows[fired], compact] = 1
    co = dense.T @ dense  # [u, u]: diagonal = counts, off-diagonal = co-counts
    feature_counts = torch.zeros(n_latents, dtype=torch.int64)
    feature_counts[used] = co.diagonal()
    i, j = torch.triu(co, diagonal=1).nonzero(as_tuple=True)  # row-major, so sorted by (i, j)
    return feature_counts, torch.stack([used[i], used[j]]), co[i, j]


def random_code(n_rows: int, n_latents: int, max_active: int, seed: int) -> SparseCode:
    """Variable active count per row (as batchtopk), latents in no particular order, some values ≤
    0."""
    g = torch.Generator().manual_seed(seed)
    per_row = torch.randint(0, max_active + 1, (n_rows,), generator=g)
    cols = torch.cat([torch.randperm(n_latents, generator=g)[:k] for k in per_row.tolist()])
    values = torch.randn(len(cols), generator=g)  # ≤ 0 entries are in the code but did not fire
    return SparseCode(values, cols, torch.arange(n_rows).repeat_interleave(per_row), n_rows)


def split_rows(code: SparseCode, size: int) -> list[SparseCode]:
    parts = []
    for lo in range(0, code.n_rows, size):
        part = (code.rows >= lo) & (code.rows < lo + size)
        n = min(size, code.n_rows - lo)
        parts.append(SparseCode(code.values[part], code.cols[part], code.rows[part] - lo, n))
    return parts


def assert_same_counts(stats: CoactivationStats, feature_counts, pair_index, pair_counts) -> None:
    assert (
        stats.feature_counts.dtype
        == stats.pair_index.dtype
        == stats.pair_counts.dtype
        == torch.int64
    )
    assert stats.feature_counts.equal(feature_counts)
    assert stats.pair_index.equal(pair_index)
    assert stats.pair_counts.equal(pair_counts)
