"""KV bytes: moving blocks between engines (the P/D handoff's gather and scatter)."""

from __future__ import annotations

import torch

from serve_hooks.kv_cache import KVCache


def test_kv_transfer_roundtrip():
    kv = KVCache(3, 10, 4, 2, 8)
    kv.k.normal_(), kv.v.normal_()
    k, v = kv.gather([7, 2])
    other = KVCache(3, 10, 4, 2, 8)
    other.scatter([0, 5], k, v)
    assert torch.equal(other.k[:, 0], kv.k[:, 7]) and torch.equal(other.v[:, 5], kv.v[:, 2])
