"""The per-family layer table: RoPE (full and Phi-3's partial) against transformers' own, and
which layers slide."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

from serve_hooks.layers import LAYERS, apply_rope, sliding_windows


@pytest.mark.parametrize("rot", [16, 8], ids=["full", "partial"])
def test_rope_equals_transformers(rot):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 4, 16, generator=g), torch.randn(5, 2, 16, generator=g)  # [n, heads, hd]
    angles = torch.randn(5, rot // 2, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # [n, rot]
    eq, ek = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    torch.testing.assert_close(apply_rope(q, cos, sin), eq)
    torch.testing.assert_close(apply_rope(k, cos, sin), ek)


def test_sliding_windows_per_family():
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    config = SimpleNamespace(num_hidden_layers=3, sliding_window=8, layer_types=types)
    assert sliding_windows(LAYERS["gemma2"], config) == [8, None, 8]
    assert sliding_windows(LAYERS["mistral"], config) == [8, 8, 8]  # Mistral: every layer
    off = SimpleNamespace(num_hidden_layers=3, sliding_window=None, layer_types=types)
    assert sliding_windows(LAYERS["qwen2"], off) == [None] * 3
