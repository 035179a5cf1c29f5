"""Block accounting under random workloads (no model), and the KV tiers with the real runner."""

from __future__ import annotations

import random
import time

import pytest
import torch

from serve_hooks.block_manager import DISK, HOST, BlockManager
from serve_hooks.config import EngineConfig
from serve_hooks.engine import LLMEngine
from serve_hooks.kv_cache import KVCache
from serve_hooks.scheduler import Scheduler
from serve_hooks.sequence import SamplingParams, Sequence
from tests.serve_hooks.conftest import hf_greedy, prompts


def fake_run(
    scheduler: Scheduler, blocks: BlockManager, rng: random.Random, cancel_rate: float
) -> int:
    """Drive the scheduler without a model: each chunk 'computes', finishing chunks emit a token."""
    steps = 0
    while scheduler.has_work():
        scheduled = scheduler.schedule()
        assert scheduled, "the scheduler stalled with work left"
        for seq, n in scheduled:
            seq.num_computed += n
            blocks.commit(seq)
        for seq, _ in scheduled:
            if seq.is_finished or seq.remaining:
                continue
            seq.output_ids.append(rng.randrange(3, 40))
            if len(seq.output_ids) >= seq.params.max_tokens:
                scheduler.finish(seq, "length")
        if rng.random() < cancel_rate and scheduler.running:
            scheduler.finish(rng.choice(scheduler.running), "abort")
        blocks.check()
        steps += 1
    return steps


@pytest.mark.parametrize("seed", range(12))
def test_no_block_leaks_under_random_workloads(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    num_blocks = rng.randint(24, 80)
    host = rng.choice([0, 8])
    kv = KVCache(2, num_blocks, block_size, 1, 2, host_blocks=host) if host else None
    blocks = BlockManager(
        num_blocks, block_size, enable_prefix_cache=rng.random() < 0.8, kv=kv, host_blocks=host
    )
    cfg = EngineConfig(
        block_size=block_size,
        max_num_seqs=rng.randint(1, 8),
        max_num_batched_tokens=rng.randint(4, 48),
        chunked_prefill=True,
    )
    scheduler = Scheduler(cfg, blocks)
    heads = [[rng.randrange(3, 40) for _ in range(rng.randint(0, 20))] for _ in range(3)]
    for i in range(rng.randint(10, 40)):
        prompt = rng.choice(heads) + [rng.randrange(3, 40) for _ in range(rng.randint(1, 15))]
        params = SamplingParams(max_tokens=rng.randint(1, 12))
        if blocks.blocks_for(len(prompt) + params.max_tokens) <= num_blocks:
            scheduler.add(
                Sequence(
                    prompt, params, cache_key=rng.choice(["", "", "steer"]), arrival_time=float(i)
                )
            )
    fake_run(scheduler, blocks, rng, cancel_rate=0.05)
    assert all(r == 0 for r in blocks.ref), "a finished workload holds no references"
    assert blocks.num_available == num_blocks
    assert len(blocks.host_free) + sum(1 for n in _nodes(blocks) if n.tier == HOST) == host


def _nodes(blocks: BlockManager):
    for root in blocks.roots.values():
        yield from root.subtree()[1:]


def engine(model, **settings) -> LLMEngine:
    base = dict(model="tiny", num_blocks=20, block_size=4, max_num_batched_tokens=64)
    return LLMEngine(EngineConfig(**{**base, **settings}), model)


def flood(llm: LLMEngine, seed: int) -> None:
    """Unrelated requests that push every idle cached block out of the device pool."""
    llm.generate(prompts(4, seed=seed), SamplingParams(max_tokens=8, ignore_eos=True))


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_spilled_prefix_is_restored_not_recomputed(lively, tier, tmp_path):
    settings = (
        {"host_blocks": 64}
        if tier == "host"
        else {"host_blocks": 2, "disk_dir": str(tmp_path / "kv")}
    )
    llm = engine(lively, **settings)
    [prompt] = prompts(1, seed=5, shared=40)
    expected = hf_greedy(lively, prompt, 6)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    assert llm.generate([prompt], params)[0].token_ids == expected
    flood(llm, seed=6)
    tiers = {n.tier for n in _nodes(llm.blocks) if len(n.tokens)}
    assert (HOST if tier == "host" else DISK) in tiers, (
        f"the flood should have spilled blocks to {tier}"
    )
    again = llm.generate([prompt], params)[0]
    assert again.token_ids == expected, "restored KV must give the same continuation"
    assert again.num_cached_tokens >= 40
    assert llm.blocks.stats[f"restored_{tier}"] > 0
    llm.blocks.check()


def test_disk_blocks_expire(lively, tmp_path):
    llm = engine(lively, host_blocks=1, disk_dir=str(tmp_path / "kv"), disk_ttl_s=0.05)
    [prompt] = prompts(1, seed=5, shared=40)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    llm.generate([prompt], params)
    flood(llm, seed=6)
    assert list((tmp_path / "kv").glob("*.safetensors")), "blocks should be on disk"
    time.sleep(0.1)
    again = llm.generate([prompt], params)[0]
    assert llm.blocks.stats["restored_disk"] == 0 and again.num_cached_tokens < 40
    llm.blocks.check()


def test_kv_transfer_roundtrip():
    kv = KVCache(3, 10, 4, 2, 8)
    kv.k.normal_(), kv.v.normal_()
    k, v = kv.gather([7, 2])
    other = KVCache(3, 10, 4, 2, 8)
    other.scatter([0, 5], k, v)
    assert torch.equal(other.k[:, 0], kv.k[:, 7]) and torch.equal(other.v[:, 5], kv.v[:, 2])
