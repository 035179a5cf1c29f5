"""Sparse SAE kernels: gradients flow only through the selected latents.

A sparse code is CSR-like: `values[nnz]`, `cols[nnz]` (latent index) and `rows[nnz]` (token index,
sorted), so TopK (k per token) and BatchTopK (a variable count per token) share one kernel.

    sparse_decode(values, cols, rows, W_dec, n_rows)  = Σ_j values_ij · W_dec[j]      -> [N, d]
    sparse_encode(pre, x_c, W_enc, cols, rows)        = pre[rows, cols] (with a sparse backward)

The encoder's forward GEMM is dense (every pre-activation is needed to pick the top k), but its
backward is not: dL/dW_enc[j] = Σ_{i: j active in i} g_ij · x_c[i] touches nnz = N·k rows instead of
N·n_latents, done as an `embedding_bag` over tokens grouped by latent. The decoder uses
`embedding_bag` with per-sample weights, whose autograd is already sparse in the same way.
Each kernel has an eager dense reference (`*_reference`) that tests compare it with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def row_offsets(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Start of each row's entries in a row-sorted COO list. rows: [nnz] -> [n_rows].

    A binary search of each row id (the first entry >= i), not bincount + cumsum: CUDA's bincount
    reads the largest id back to the host, a sync in every sparse kernel call."""
    ids = torch.arange(n_rows, dtype=rows.dtype, device=rows.device)
    return torch.searchsorted(rows, ids)


def sparse_decode(
    values: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor, W_dec: torch.Tensor, n_rows: int
) -> torch.Tensor:
    """Σ_j values_ij W_dec[j] for each row i. values, cols, rows: [nnz]; W_dec: [n, d]
    -> [n_rows, d]."""
    return F.embedding_bag(
        cols, W_dec, row_offsets(rows, n_rows), mode="sum", per_sample_weights=values
    )


def sparse_decode_reference(
    values: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor, W_dec: torch.Tensor, n_rows: int
) -> torch.Tensor:
    dense = torch.zeros(n_rows, W_dec.shape[0], dtype=values.dtype, device=values.device)
    dense = dense.index_put((rows, cols), values, accumulate=True)  # [n_rows, n]
    return dense @ W_dec


class _SparseEncode(torch.autograd.Function):
    """Gather pre[rows, cols]; backward scatters only into the selected (row, col) pairs."""

    @staticmethod
    def forward(ctx, pre, x_c, W_enc, b_enc, cols, rows, values):  # noqa: ARG004
        # b_enc is an input only so that its gradient comes from backward; pre gets none (it was
        # computed without grad), the sparse path carries every gradient
        ctx.save_for_backward(x_c, W_enc, cols, rows)
        return pre[rows, cols] if values is None else values.clone()

    @staticmethod
    def backward(ctx, grad_values):  # grad_values: [nnz]
        x_c, W_enc, cols, rows = ctx.saved_tensors
        n_rows, n_latents = x_c.shape[0], W_enc.shape[0]
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[1]:  # dL/dx_c[i] = Σ_j g_ij W_enc[j]
            grad_x = F.embedding_bag(
                cols, W_enc, row_offsets(rows, n_rows), mode="sum", per_sample_weights=grad_values
            )
        if ctx.needs_input_grad[2]:  # dL/dW_enc[j] = Σ_i g_ij x_c[i], tokens grouped by latent
            by_latent = torch.argsort(cols, stable=True)
            grad_W = F.embedding_bag(
                rows[by_latent],
                x_c,
                row_offsets(cols[by_latent], n_latents),
                mode="sum",
                per_sample_weights=grad_values[by_latent],
            )
        if ctx.needs_input_grad[3]:
            grad_b = torch.zeros(n_latents, dtype=grad_values.dtype, device=grad_values.device)
            grad_b.index_add_(0, cols, grad_values)
        return None, grad_x, grad_W, grad_b, None, None, None


def sparse_encode(
    x_c: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    pre: torch.Tensor,
    cols: torch.Tensor,
    rows: torch.Tensor,
    values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Selected pre-activations with a sparse backward.

    x_c: [N, d] centred input; W_enc: [n, d]; b_enc: [n]; pre: [N, n] = x_c @ W_enc.T + b_enc,
    computed without grad by the caller (it needed it to select); cols, rows: [nnz] -> [nnz].
    values: pre[rows, cols] when the caller has them already (topk returns them), which spares a
    random-access gather over the [N, n] matrix.
    """
    return _SparseEncode.apply(pre, x_c, W_enc, b_enc, cols, rows, values)


def sparse_encode_reference(
    x_c: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    pre: torch.Tensor,
    cols: torch.Tensor,
    rows: torch.Tensor,
) -> torch.Tensor:
    del pre  # recomputed with autograd: the dense, obviously-correct path
    return (x_c @ W_enc.T + b_enc)[rows, cols]
