"""Sparse codes: the active latents of a batch, and the rules that pick them from pre-activations.

A code is row-sorted COO (`SparseCode`): values, latent ids (cols) and token ids (rows) of the
active entries, so TopK (k per token), BatchTopK (k per token on average) and the dense
architectures (whatever is non-zero) share one format and one set of kernels (`sae.kernels`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class SparseCode(NamedTuple):
    """Active latents in row-sorted COO form (variable count per token)."""

    values: torch.Tensor  # [nnz]
    cols: torch.Tensor  # [nnz] latent index
    rows: torch.Tensor  # [nnz] token index, non-decreasing
    n_rows: int

    def to_dense(self, n_latents: int) -> torch.Tensor:  # [n_rows, n_latents]
        values = self.values
        dense = torch.zeros(self.n_rows, n_latents, dtype=values.dtype, device=values.device)
        return dense.index_put((self.rows, self.cols), values, accumulate=True)

    def l0(self) -> torch.Tensor:
        return (self.values > 0).sum() / max(self.n_rows, 1)

    def detach(self) -> SparseCode:
        return self._replace(values=self.values.detach())

    def top(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's n largest entries, largest first, padded with (0, 0.0) where a row has fewer:
        (latent ids [n_rows, n] int64, values [n_rows, n]). The values equal
        `to_dense(n_latents).topk(n)`'s without building the [n_rows, n_latents] matrix."""
        by_value = self.values.argsort(descending=True, stable=True)
        # by row, then by value descending
        order = by_value[self.rows[by_value].argsort(stable=True)]
        rows, counts = self.rows[order], torch.bincount(self.rows, minlength=self.n_rows)
        first = torch.cumsum(counts, 0) - counts  # [n_rows] where each row starts in `order`
        rank = torch.arange(order.numel(), device=rows.device) - first[rows]
        keep = rank < n
        ids = torch.zeros(self.n_rows, n, dtype=torch.long, device=rows.device)
        values = torch.zeros(self.n_rows, n, dtype=self.values.dtype, device=rows.device)
        ids[rows[keep], rank[keep]] = self.cols[order[keep]]
        values[rows[keep], rank[keep]] = self.values[order[keep]]
        return ids, values


def topk_code(pre: torch.Tensor, k: int) -> SparseCode:
    """The k largest ReLU(pre) of each token. pre: [N, n_latents] -> N·k entries."""
    values, cols = pre.topk(k, dim=1, sorted=False)  # [N, k]
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return SparseCode(values.relu().flatten(), cols.flatten(), rows, pre.shape[0])


def batch_topk_code(
    pre: torch.Tensor, k: float, hint: float = 0.0, exhaustive: bool = False
) -> SparseCode:
    """The round(k·N) largest ReLU(pre) of the whole batch: k per token on average.

    exhaustive: one topk over all N·n entries, with fixed shapes (nothing read back to the host:
    the sync-free path of the CUDA training step). Otherwise:

    A topk over all N·n entries is slow. Two exact shortcuts:
    - hint > 0, a value expected just below the batch's cut (training passes `SAE.cut_hint()`,
      0.85 × the previous batch's cut): if at least round(k·N) entries exceed it, the
      round(k·N)-th largest value does too, so every winner is among those entries, and one
      compare + nonzero + topk over them finds the winners, several times faster than the
      row-wise method. With fewer entries above the hint, the row-wise method below runs: a bad
      hint costs time, never correctness.
    - Row-wise: each row's top 4k hold every winner of that row unless the row's 4k-th value still
      reaches the batch cut; only such rows (typically about 1%) contribute all their entries.
      Excluded entries are below the first cut, and adding candidates can only raise the cut.
    """
    n_rows, n_latents = pre.shape
    n_keep = max(1, min(round(k * n_rows), pre.numel()))
    if exhaustive:
        values, flat = pre.flatten().topk(n_keep, sorted=False)
        return _row_major_code(values.relu(), flat, n_rows, n_latents)
    if hint > 0:
        flat = (pre.reshape(-1) > hint).nonzero().squeeze(1)  # [C] entries above the hint
        if len(flat) >= n_keep:
            values, picked = pre.reshape(-1)[flat].topk(n_keep, sorted=False)
            # values > hint > 0: ReLU is a no-op
            return _row_major_code(values, flat[picked], n_rows, n_latents)
    per_row = 4 * max(1, math.ceil(k))
    if per_row >= n_latents:
        values, flat = pre.flatten().topk(n_keep, sorted=False)
        return _row_major_code(values.relu(), flat, n_rows, n_latents)
    # ReLU commutes with topk (it is monotone), so it is applied to the few candidates, not to N·n
    row_values, row_cols = pre.topk(per_row, dim=1, sorted=False)  # [N, per_row]
    row_values = row_values.relu()
    cut = row_values.flatten().topk(n_keep, sorted=False).values.min()
    full = row_values.min(dim=1).values >= cut  # [N] rows that may hold more winners
    rows = torch.arange(n_rows, device=pre.device)
    candidates = row_values[~full].flatten()
    flat = (rows[~full, None] * n_latents + row_cols[~full]).flatten()
    if bool(full.any()):
        full_rows = rows[full]
        candidates = torch.cat([candidates, pre[full_rows].relu().flatten()])
        every = full_rows[:, None] * n_latents + torch.arange(n_latents, device=pre.device)
        flat = torch.cat([flat, every.flatten()])
    values, picked = candidates.topk(n_keep, sorted=False)
    return _row_major_code(values, flat[picked], n_rows, n_latents)


def dense_to_code(acts: torch.Tensor) -> SparseCode:
    """The non-zero entries of dense activations [N, n_latents], row-major."""
    rows, cols = acts.nonzero(as_tuple=True)
    return SparseCode(acts[rows, cols], cols, rows, acts.shape[0])


def _row_major_code(
    values: torch.Tensor, flat: torch.Tensor, n_rows: int, n_latents: int
) -> SparseCode:
    flat, order = flat.sort()  # row-major order: rows non-decreasing
    return SparseCode(values[order], flat % n_latents, flat // n_latents, n_rows)
