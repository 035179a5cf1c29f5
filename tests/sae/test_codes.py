"""Sparse codes: BatchTopK's selection against a plain topk, and SparseCode's per-row top n."""

from __future__ import annotations

import pytest
import torch

from sae.codes import SparseCode, batch_topk_code

N, LATENTS, K = 37, 96, 5


def test_batch_topk_gives_variable_counts_per_token_and_sorted_rows() -> None:
    pre = torch.randn(N, LATENTS, generator=torch.Generator().manual_seed(3))
    pre[0] += 5  # one token with many strong latents
    code = batch_topk_code(pre, K)
    counts = torch.bincount(code.rows, minlength=N)
    assert counts.sum() == K * N and counts[0] > K and counts.min() < K
    assert (code.rows[1:] >= code.rows[:-1]).all()
    dense = pre.relu()
    assert code.values.min() >= dense.flatten().topk(K * N).values.min()


@pytest.mark.parametrize(
    "boost", [0.0, 50.0], ids=["row-topk-prefilter", "one-row-dominates-fallback"]
)
@pytest.mark.parametrize("hint_over_cut", [0.0, 0.5, 0.999, 1.001, 100.0], ids=lambda h: f"hint{h}")
def test_batch_topk_equals_a_topk_over_the_flattened_batch(
    boost: float, hint_over_cut: float, monkeypatch
) -> None:
    """Any hint gives the exact result: below the cut (0.5, 0.999 × cut) through the hint's own
    pass, above it (1.001, 100 × cut) through the row-wise method, which the spy counts."""
    pre = torch.randn(64, 200, generator=torch.Generator().manual_seed(4))
    # with the boost row 5 holds more than 4k of the winners: the prefilter can't be used
    pre[5] += boost
    cut = float(pre.relu().flatten().topk(3 * 64).values.min())
    row_wise = []
    topk = torch.Tensor.topk
    monkeypatch.setattr(
        torch.Tensor,
        "topk",
        lambda t, *a, **kw: (row_wise.append(t.ndim == 2), topk(t, *a, **kw))[1],
    )
    code = batch_topk_code(pre, 3, hint=hint_over_cut * cut)
    monkeypatch.undo()
    assert any(row_wise) == (hint_over_cut == 0.0 or hint_over_cut > 1)
    values, flat = pre.relu().flatten().topk(3 * 64)
    flat, order = flat.sort()
    assert torch.equal(code.rows, flat // 200) and torch.equal(code.cols, flat % 200)
    assert torch.equal(code.values, values[order])
    assert (int((code.rows == 5).sum()) > 12) == (boost > 0)


def test_sparse_top_n_per_row_equals_dense_topk() -> None:
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 2, 9, 1])  # uneven rows, one empty, some with fewer than n
    rows = torch.repeat_interleave(torch.arange(5), counts)
    cols = torch.cat([torch.randperm(40, generator=g)[: int(c)] for c in counts])
    values = torch.rand(len(rows), generator=g) + 0.1
    code = SparseCode(values, cols, rows, 5)
    ids, top = code.top(3)
    dense = code.to_dense(40)
    reference = dense.topk(3, dim=1)
    assert torch.equal(top, reference.values)
    filled = top > 0
    assert torch.equal(ids[filled], reference.indices[filled]), "ids of real entries match"
    assert torch.equal(ids[~filled], torch.zeros_like(ids[~filled])), "padding is (0, 0.0)"
    assert torch.equal(dense.gather(1, ids) * filled, top)
