"""Every fast kernel against its eager dense reference: outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from sae.codes import batch_topk_code, topk_code
from sae.kernels import (
    sparse_decode,
    sparse_decode_reference,
    sparse_encode,
    sparse_encode_reference,
)

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


def test_decode_gradcheck_in_float64() -> None:
    x_c, W_enc, b_enc, W_dec = _inputs(2)
    code = topk_code((x_c @ W_enc.T + b_enc).detach(), K)
    values = code.values.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, w: sparse_decode(v, code.cols, code.rows, w, N), (values, W_dec)
    )
