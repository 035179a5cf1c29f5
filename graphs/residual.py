"""Missed features: latents a code left silent though what it failed to reconstruct points at them.

Why: a child feature that has absorbed its parent ("snake" carrying "starts with s") fires instead
of the parent, so the pair rarely co-fires and co-activation never proposes the edge child → parent
that the graph step exists for. What betrays the pair is the residual. Whenever the child's decoder
copies only part of the parent's direction, the rest of the parent's direction stays in r = x − x̂,
on tokens where the child fires and the parent does not. Counting "i active, j missed" per token
(`graphs.coactivation`, `--residual`) therefore ranks child → parent edges first.

For token t with code e_t (values in the SAE's normalised space), reconstruction x̂_t and unit
decoder rows d_j:

    r_t  = x_t − x̂_t                       (normalised space; b_dec is part of x̂_t)
    p_tj = r_t · d_j
    τ    = mean over the batch's coded tokens of min_{i: e_ti > 0} e_ti
    j is missed at t  ⇔  e_tj = 0  and  p_tj > τ
                          and p_tj is among the token's `max_per_token` largest projections

The bar τ is the typical activation of the weakest latent a code keeps (for a BatchTopK SAE, about
its threshold θ): the residual must carry d_j as strongly as a latent that would have been kept,
which makes the rule scale-free. The bar is one number per batch, not each token's own weakest
value: a token whose k-th latent is noise (fewer than k features present) would otherwise report
noise as missed, and a token whose k-th latent is strong would hide a real parent. A token with no
active latent (a passthrough row) misses nothing.
"""

from __future__ import annotations

import torch

from sae.kernels import sparse_decode
from sae.sae import SparseCode


@torch.no_grad()
def missed_features(
    x_n: torch.Tensor,
    code: SparseCode,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    max_per_token: int,
) -> SparseCode:
    """The missed (token, latent) entries of a batch, row-major, values = p_tj.

    x_n: [N, d] inputs in the SAE's normalised space (x · input_scale); code: their sparse code;
    W_dec: [n, d] decoder rows (normalised here); b_dec: [d]. Cost: one [N, d] × [d, n] GEMM.
    """
    if max_per_token < 1:
        raise ValueError(f"max_per_token must be at least 1, got {max_per_token}")
    n_rows, n = code.n_rows, W_dec.shape[0]
    active = code.values > 0
    rows, cols, values = code.rows[active], code.cols[active], code.values[active]
    x_hat = sparse_decode(values, cols, rows, W_dec, n_rows) + b_dec  # [N, d]
    proj = (x_n - x_hat) @ torch.nn.functional.normalize(W_dec, dim=1).T  # [N, n]
    proj[rows, cols] = -torch.inf  # active latents are not missed
    weakest = torch.full((n_rows,), torch.inf, dtype=proj.dtype, device=proj.device)
    # [N]; inf: nothing active
    weakest.scatter_reduce_(0, rows, values.to(proj.dtype), reduce="amin")
    coded = weakest.isfinite()  # [N]
    if not bool(coded.any()):
        return SparseCode(proj.new_zeros(0), rows.new_zeros(0), rows.new_zeros(0), n_rows)
    bar = weakest[coded].mean()
    top, at = proj.topk(min(max_per_token, n), dim=1)  # [N, M]
    keep = (top > bar) & coded[:, None]
    token = torch.arange(n_rows, device=proj.device)[:, None].expand_as(at)
    flat, order = (token[keep] * n + at[keep]).sort()  # row-major, as every SparseCode
    return SparseCode(top[keep][order], flat % n, flat // n, n_rows)
