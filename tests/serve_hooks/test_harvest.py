"""Harvest from live traffic: the store holds each served token once, equal to an offline
capture."""

from __future__ import annotations

import torch

from sae.hooks import capture
from sae.store import ActivationStore
from serve_hooks.config import EngineConfig
from serve_hooks.engine import LLMEngine
from serve_hooks.harvest import TrafficHarvester
from serve_hooks.sequence import SamplingParams
from tests.serve_hooks.conftest import prompts

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def test_live_traffic_store_matches_offline_capture(lively, tmp_path):
    engine = LLMEngine(
        EngineConfig(model="tiny", num_blocks=14, block_size=4, max_num_batched_tokens=16), lively
    )
    harvester = TrafficHarvester(engine, tmp_path / "live", HOOKS, shard_tokens=50, dtype="float32")
    cases = prompts(6, seed=16)
    outs = engine.generate(cases, SamplingParams(max_tokens=5, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0, "the small pool should force recomputation"
    manifest = harvester.close()
    store = ActivationStore(tmp_path / "live")
    assert manifest.complete and len(manifest.shards) > 1 and store.hooks == HOOKS
    rows = store.rows(torch.arange(len(store)))
    by_request = {}
    for i, doc in enumerate(rows["doc_ids"].tolist()):
        by_request.setdefault(doc, []).append(i)
    assert len(by_request) == len(cases)
    for case, out in zip(cases, outs, strict=True):
        ids = case + out.token_ids[:-1]  # every token the model read, each exactly once
        picked = torch.tensor(by_request[out.seq_id])
        order = rows["positions"][picked].argsort()
        assert rows["positions"][picked][order].tolist() == list(range(len(ids)))
        assert rows["token_ids"][picked][order].tolist() == ids
        offline = capture(lively, torch.tensor([ids]), HOOKS)
        for hook in HOOKS:
            assert torch.allclose(rows[hook][picked][order], offline[hook][0], atol=1e-4)


def test_sampling_keeps_a_subset(lively, tmp_path):
    engine = LLMEngine(EngineConfig(model="tiny", num_blocks=64, block_size=4), lively)
    harvester = TrafficHarvester(engine, tmp_path / "live", HOOKS[:1], sample=0.5, dtype="float32")
    outs = engine.generate(prompts(20, seed=17), SamplingParams(max_tokens=2, ignore_eos=True))
    harvester.close()
    kept = set(
        ActivationStore(tmp_path / "live")
        .rows(torch.arange(len(ActivationStore(tmp_path / "live"))))["doc_ids"]
        .tolist()
    )
    assert 0 < len(kept) < len(outs) and kept <= {o.seq_id for o in outs}
