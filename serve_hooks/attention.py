"""Attention over the paged KV pool: masks (causal, sliding window) and the kernel choice.

`attend` runs torch's SDPA (fused kernels on CPU and CUDA); a soft-capped layer (Gemma-2:
logits = cap · tanh(logits / cap)) cannot go through SDPA and runs `eager_attention`, an explicit
softmax(q kᵀ · scale) v with the same masks. Masks are bool, True where a query may see a key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def prefill_mask(start: int, q_len: int, window: int | None, device: torch.device) -> Tensor | None:
    """[q_len, start + q_len] bool for a chunk whose query j sits at position start + j and whose
    keys are positions 0..start + q_len - 1; None when it is plainly causal (start 0, no window)."""
    if start == 0 and window is None:
        return None
    keys = torch.arange(start + q_len, device=device)[None]  # [1, ctx]
    queries = (start + torch.arange(q_len, device=device))[:, None]  # [q_len, 1]
    mask = keys <= queries
    if window is not None:  # HF: key kept when kv_idx > q_idx - window
        mask &= keys > queries - window
    return mask


def decode_mask(lengths: Tensor, longest: int, window: int | None) -> Tensor:
    """[n_decode, 1, 1, longest] bool: each decode row sees its first `length` slots (its query is
    the last), or only the last `window` of them."""
    keys = torch.arange(longest, device=lengths.device)[None]  # [1, longest]
    mask = keys < lengths[:, None]
    if window is not None:
        mask &= keys >= lengths[:, None] - window
    return mask[:, None, None]


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, softcap: float | None
) -> Tensor:
    """q [b, heads, q_len, hd], k/v [b, kv_heads, ctx, hd] (GQA: heads a multiple of kv_heads),
    mask [.., q_len, ctx] bool or None for causal (q_len == ctx) -> [b, heads, q_len, hd]."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
        )
    return eager_attention(q, k, v, mask, scale, softcap)


def eager_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, softcap: float | None
) -> Tensor:
    """The explicit form (as transformers' eager attention): logits, optional soft-cap, mask,
    softmax in fp32. Shapes as `attend`."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # [b, heads, ctx, hd]
    v = v.repeat_interleave(groups, dim=1)
    logits = q @ k.transpose(-1, -2) * scale  # [b, heads, q_len, ctx]
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if mask is None:
        mask = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device).tril()
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype) @ v
