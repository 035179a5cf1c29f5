"""scripts/_cache.py: a cached result is reused only for the configuration that made it, and the
command recorded is the one that made it, not the one that reused it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from _cache import cached_json, config_hash, content_digest, keyed  # noqa: E402


def test_hash_is_canonical_and_sensitive() -> None:
    assert config_hash({"a": 1, "b": [2, 3]}) == config_hash({"b": [2, 3], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert keyed("root", "topk", {"k": 32}) != keyed("root", "topk", {"k": 16})


def test_cached_json_reuses_only_the_same_config(tmp_path, monkeypatch) -> None:
    calls = []

    def compute(value: int):
        calls.append(value)
        return {"value": value}

    monkeypatch.setattr(sys, "argv", ["make.py", "--k", "1"])
    first = cached_json(tmp_path, "eval", {"k": 1}, lambda: compute(1))
    monkeypatch.setattr(sys, "argv", ["reuse.py", "--k", "1"])
    again = cached_json(tmp_path, "eval", {"k": 1}, lambda: compute(99))
    other = cached_json(tmp_path, "eval", {"k": 2}, lambda: compute(2))
    assert calls == [1, 2]  # the second call reused the first result
    assert again["value"] == 1 and other["value"] == 2
    assert first["_command"] == again["_command"] == "python make.py --k 1"
    assert other["_command"] == "python reuse.py --k 1"


def test_content_digest_follows_the_bytes(tmp_path) -> None:
    sae = tmp_path / "sae"
    sae.mkdir()
    save_file({"w": torch.zeros(3)}, sae / "sae.safetensors")
    before = content_digest(sae)
    save_file({"w": torch.ones(3)}, sae / "sae.safetensors")  # retrained in place
    assert content_digest(sae) != before
    with pytest.raises(FileNotFoundError, match="no safetensors"):
        content_digest(tmp_path / "empty-dir-that-is-missing")
