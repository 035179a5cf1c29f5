"""Every fast kernel against its eager dense reference: outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from sae.kernels import (
    sparse_decode,
    sparse_decode_reference,
    sparse_encode,
    sparse_encode_reference,
)
from sae.sae import batch_topk_code, topk_code

N, D, LATENTS, K = 37, 16, 96, 5


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    x_c = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    W_enc = torch.randn(LATENTS, D, generator=g, dtype=torch.float64, requires_grad=True)
    b_enc = torch.randn(LATENTS, generator=g, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(LATENTS, D, generator=g, dtype=torch.float64, requires_grad=True)
    return x_c, W_enc, b_enc, W_dec


@pytest.mark.parametrize(
    "select",
    [lambda p: topk_code(p, K), lambda p: batch_topk_code(p, K)],
    ids=["topk", "batchtopk"],
)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("pass_values", [False, True], ids=["gathered", "code-values-passed"])
def test_sparse_encode_then_decode_matches_the_dense_reference(
    select, seed: int, pass_values: bool
) -> None:
    """pass_values: the fast kernel is handed the code's values (ReLU(pre) at the selected entries,
    as SAE training does) instead of gathering pre; under the ReLU applied after, the same."""
    results = []
    for encode, decode in (
        (sparse_encode, sparse_decode),
        (sparse_encode_reference, sparse_decode_reference),
    ):
        x_c, W_enc, b_enc, W_dec = _inputs(seed)
        with torch.no_grad():
            pre = x_c @ W_enc.T + b_enc
        code = select(pre)
        given = (code.values,) if pass_values and encode is sparse_encode else ()
        values = encode(x_c, W_enc, b_enc, pre, code.cols, code.rows, *given).relu()
        out = decode(values, code.cols, code.rows, W_dec, N)  # [N, D]
        target = torch.randn(N, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        ((out - target) ** 2).sum().backward()
        results.append((out.detach(), x_c.grad, W_enc.grad, b_enc.grad, W_dec.grad))
    for fast, reference in zip(*results, strict=True):
        torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)
    assert results[0][2].abs().sum() > 0  # gradients really flowed


def test_batch_topk_gives_variable_counts_per_token_and_sorted_rows() -> None:
    pre = torch.randn(N, LATENTS, generator=torch.Generator().manual_seed(3))
    pre[0] += 5  # one token with many strong latents
    code = batch_topk_code(pre, K)
    counts = torch.bincount(code.rows, minlength=N)
    assert counts.sum() == K * N and counts[0] > K and counts.min() < K
    assert (code.rows[1:] >= code.rows[:-1]).all()
    dense = pre.relu()
    assert code.values.min() >= dense.flatten().topk(K * N).values.min()


def test_decode_gradcheck_in_float64() -> None:
    x_c, W_enc, b_enc, W_dec = _inputs(2)
    code = topk_code((x_c @ W_enc.T + b_enc).detach(), K)
    values = code.values.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, w: sparse_decode(v, code.cols, code.rows, w, N), (values, W_dec)
    )


@pytest.mark.parametrize(
    "boost", [0.0, 50.0], ids=["row-topk-prefilter", "one-row-dominates-fallback"]
)
@pytest.mark.parametrize("hint_over_cut", [0.0, 0.5, 0.999, 1.001, 100.0], ids=lambda h: f"hint{h}")
def test_batch_topk_equals_a_topk_over_the_flattened_batch(
    boost: float, hint_over_cut: float, monkeypatch
) -> None:
    """Any hint gives the exact result: below the cut (0.5, 0.999 × cut) through the hint's own pass,
    above it (1.001, 100 × cut) through the row-wise method, which the spy counts."""
    pre = torch.randn(64, 200, generator=torch.Generator().manual_seed(4))
    pre[5] += (
        boost  # with the boost row 5 holds more than 4k of the winners: the prefilter can't be used
    )
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
