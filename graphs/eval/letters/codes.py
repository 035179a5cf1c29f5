"""What every letter metric reads: SAE codes (dense or sparse), checked once, gathered sparsely.

Codes are a dense [N, n_latents] tensor or a `SparseCode`; nothing here copies a code per letter
(100k tokens × 9216 latents would be 3.7 GB dense): mean differences are one weighted sum over
rows, then only the chosen columns are gathered.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from graphs.first_letter import LETTERS
from sae.sae import SparseCode

Codes = Tensor | SparseCode  # dense [N, n_latents] (non-negative) or row-sorted COO


def n_rows(codes: Codes) -> int:
    return codes.n_rows if isinstance(codes, SparseCode) else codes.shape[0]


def check_task(
    codes: Codes | None,
    labels: Tensor,
    letters: Sequence[int],
    ks: Sequence[int] = (1,),
    x: Tensor | None = None,
) -> None:
    """Fail before any probe is fitted, naming the fix."""
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {tuple(labels.shape)}")
    if bad := [L for L in letters if not 0 <= int(L) < len(LETTERS)]:
        raise ValueError(f"letters must be indices 0..25 (a..z); got {bad}")
    if not letters:
        raise ValueError("no letters to evaluate: pass letters, or letter_metrics(letters=None)")
    if x is not None and (x.ndim != 2 or len(x) != len(labels)):
        raise ValueError(f"x must be [N={len(labels)}, d_model], got {tuple(x.shape)}")
    if codes is None:
        return
    if n_rows(codes) != len(labels):
        raise ValueError(f"codes have {n_rows(codes)} rows, labels {len(labels)}: same tokens?")
    values = codes.values if isinstance(codes, SparseCode) else codes
    if values.numel() and float(values.min()) < 0:
        raise ValueError("codes are negative somewhere: pass post-activation SAE codes")
    # a SparseCode does not know its width (its top latents may never fire): only dense is capped
    top = codes.shape[1] if not isinstance(codes, SparseCode) else float("inf")
    if bad_k := [k for k in ks if not 1 <= k <= top]:
        raise ValueError(f"ks must be in 1..n_latents ({top}); got {bad_k}")


def check_decoder(decoder: Tensor, d_model: int, codes: Codes | None = None) -> None:
    """decoder: [n_latents, d_model] rows in x's space, wide enough for every latent the codes
    use."""
    if decoder.ndim != 2 or decoder.shape[1] != d_model:
        raise ValueError(
            f"decoder must be [n_latents, d_model={d_model}] rows in x's space, "
            f"got {tuple(decoder.shape)}"
        )
    if codes is None:
        return
    if isinstance(codes, SparseCode):
        width = int(codes.cols.max()) + 1 if len(codes.cols) else 0
    else:
        width = codes.shape[1]
    if width > decoder.shape[0]:
        raise ValueError(
            f"the codes use latent {width - 1} but the decoder has {decoder.shape[0]} rows: "
            "same SAE?"
        )


def mean_difference(codes: Codes, rows: Tensor, y: Tensor) -> Tensor:
    """[n_latents] mean code on positive rows minus mean on negative rows, rows not copied."""
    weight = torch.zeros(n_rows(codes), dtype=torch.float64)  # +1/n_pos, -1/n_neg, 0 elsewhere
    weight[rows[y]] = 1.0 / max(int(y.sum()), 1)
    weight[rows[~y]] = -1.0 / max(int((~y).sum()), 1)
    if isinstance(codes, SparseCode):
        contrib = weight[codes.rows] * codes.values.double()  # [nnz]
        n_latents = int(codes.cols.max()) + 1 if len(codes.cols) else 1
        return torch.zeros(n_latents, dtype=torch.float64).index_add_(0, codes.cols, contrib)
    return weight.to(codes.dtype) @ codes


def gather(codes: Codes, rows: Tensor, cols: Tensor) -> Tensor:
    """[len(rows), len(cols)] float32 sub-matrix of the code (rows distinct)."""
    if not isinstance(codes, SparseCode):
        return codes[rows[:, None], cols[None, :]].float()
    slot = torch.full((codes.n_rows,), -1, dtype=torch.int64)
    slot[rows] = torch.arange(len(rows))
    keep = torch.isin(codes.cols, cols) & (slot[codes.rows] >= 0)  # [nnz]
    col_slot = (codes.cols[keep, None] == cols[None, :]).int().argmax(1)
    out = torch.zeros(len(rows), len(cols))
    index = (slot[codes.rows[keep]], col_slot)
    return out.index_put_(index, codes.values[keep].float(), accumulate=True)


def active_entries(codes: Codes, rows: Tensor) -> SparseCode:
    """The active entries of the given (distinct) rows, re-indexed 0..len(rows)-1."""
    if not isinstance(codes, SparseCode):
        sub = codes[rows]
        r, c = sub.nonzero(as_tuple=True)
        return SparseCode(sub[r, c].float(), c, r, len(rows))
    slot = torch.full((codes.n_rows,), -1, dtype=torch.int64)
    slot[rows] = torch.arange(len(rows))
    keep = (slot[codes.rows] >= 0) & (codes.values > 0)
    return SparseCode(
        codes.values[keep].float(), codes.cols[keep], slot[codes.rows[keep]], len(rows)
    )


def nanmean(values: list[float]) -> float:
    """Mean of the values that are not NaN (NaN if none is)."""
    kept = [v for v in values if v == v]
    return sum(kept) / len(kept) if kept else float("nan")
