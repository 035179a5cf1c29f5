"""Reading the plugin's sink: a request's file is found by the id the caller gave vLLM."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from serve_hooks import vllm_plugin
from serve_hooks.vllm_features import plugin_env, read_features


def test_read_features_matches_external_ids_only(tmp_path):
    for name in ("1-abcdefgh", "11-abcdefgh"):
        save_file(
            {
                "computed": torch.ones(2, dtype=torch.bool),
                "token_ids": torch.zeros(2, dtype=torch.long),
            },
            tmp_path / f"{name}.safetensors",
            metadata={"hooks": "[]"},
        )
    assert read_features(tmp_path, "1", timeout=0).request_id == "1-abcdefgh"
    assert read_features(tmp_path, "11-abcdefgh", timeout=0).request_id == "11-abcdefgh"
    with pytest.raises(FileNotFoundError, match="no features for request '2'"):
        read_features(tmp_path, "2", timeout=0)


def test_the_plugin_module_still_offers_the_reading_side():
    assert vllm_plugin.read_features is read_features and vllm_plugin.plugin_env is plugin_env
