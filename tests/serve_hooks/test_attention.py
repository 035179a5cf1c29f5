"""The engine's attention kernels and masks against independent references: transformers' Gemma-2
eager attention (soft-cap), torch's SDPA, and masks written out position by position."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from serve_hooks.attention import attend, decode_mask, eager_attention, prefill_mask


def qkv(q_len: int, ctx: int, heads: int = 4, kv_heads: int = 2, hd: int = 8):
    g = torch.Generator().manual_seed(q_len * 100 + ctx)
    return (
        torch.randn(1, heads, q_len, hd, generator=g) * 3,  # large logits: the cap matters
        torch.randn(1, kv_heads, ctx, hd, generator=g) * 3,
        torch.randn(1, kv_heads, ctx, hd, generator=g),
    )


@pytest.mark.parametrize("window", [None, 4])
def test_soft_capped_attention_equals_transformers_eager(window):
    q, k, v = qkv(6, 10)
    mask = prefill_mask(4, 6, window, q.device)  # [6, 10]
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    module = SimpleNamespace(num_key_value_groups=2, training=False, head_dim=8)
    expected, _ = eager_attention_forward(
        module, q, k, v, additive[None, None], scaling=0.3, softcap=5.0
    )  # [1, q_len, heads, hd]
    got = attend(q, k, v, mask, 0.3, 5.0)  # [1, heads, q_len, hd]
    torch.testing.assert_close(got.transpose(1, 2), expected)


@pytest.mark.parametrize("start", [0, 3])
def test_eager_without_cap_equals_sdpa(start):
    q, k, v = qkv(5, start + 5)
    mask = prefill_mask(start, 5, None, q.device)
    assert (mask is None) == (start == 0), "a chunk from position 0 is plainly causal"
    sdpa = attend(q, k, v, mask, 0.35, None)
    torch.testing.assert_close(eager_attention(q, k, v, mask, 0.35, None), sdpa)


def test_masks_keep_the_window_of_keys():
    window = 3
    mask = prefill_mask(4, 3, window, torch.device("cpu"))  # queries at positions 4, 5, 6
    for j, query in enumerate((4, 5, 6)):
        expected = [query - window < key <= query for key in range(7)]
        assert mask[j].tolist() == expected
    lengths = torch.tensor([2, 7])  # decode rows: query at position length - 1
    got = decode_mask(lengths, 7, window)[:, 0, 0]  # [n_decode, longest]
    assert got.tolist() == [
        [True, True] + [False] * 5,
        [False] * 4 + [True] * 3,
    ]
    assert decode_mask(lengths, 7, None)[1, 0, 0].all()
