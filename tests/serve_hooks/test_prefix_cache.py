"""The prefix cache: LRU eviction order (no model), and the KV tiers with the real runner."""

from __future__ import annotations

import time

import pytest

from serve_hooks.block_manager import BlockManager
from serve_hooks.config import EngineConfig
from serve_hooks.engine import LLMEngine
from serve_hooks.prefix_cache import DISK, HOST, PrefixCache
from serve_hooks.sequence import SamplingParams, Sequence
from tests.serve_hooks.conftest import hf_greedy, prompts


def _nodes(cache: PrefixCache):
    for root in cache.roots.values():
        yield from root.subtree()[1:]


def run_to_the_end(cache: PrefixCache, prompt: list[int]) -> None:
    """Admit a prompt, 'compute' it in one chunk, cache its full blocks and finish it."""
    seq = Sequence(prompt, SamplingParams())
    cache.admit(seq, cache.match(seq))
    cache.blocks.append(seq, seq.num_tokens - seq.num_computed)
    seq.num_computed = seq.num_tokens
    cache.commit(seq)
    cache.free(seq)


def test_eviction_takes_the_least_recently_used_deepest_first():
    blocks = BlockManager(6, 2)
    cache = PrefixCache(blocks)
    run_to_the_end(cache, [1, 2, 3, 4, 5])
    run_to_the_end(cache, [6, 7, 8, 9, 10])
    run_to_the_end(cache, [1, 2, 3, 4, 99])  # a prefix hit: (1, 2), (3, 4) are used again
    assert sorted(n.tokens for n in _nodes(cache)) == [(1, 2), (3, 4), (6, 7), (8, 9)]
    assert (len(blocks.free_blocks), blocks.n_idle) == (2, 4)
    gone = []
    for _ in range(6):
        before = {n.tokens for n in _nodes(cache)}
        blocks.take()
        gone.append(sorted(before - {n.tokens for n in _nodes(cache)}))
    assert gone == [[], [], [(8, 9)], [(6, 7)], [(3, 4)], [(1, 2)]]
    assert cache.stats["evicted"] == 4
    cache.check()


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
    tiers = {n.tier for n in _nodes(llm.cache) if len(n.tokens)}
    assert (HOST if tier == "host" else DISK) in tiers, (
        f"the flood should have spilled blocks to {tier}"
    )
    again = llm.generate([prompt], params)[0]
    assert again.token_ids == expected, "restored KV must give the same continuation"
    assert again.num_cached_tokens >= 40
    assert llm.cache.stats[f"restored_{tier}"] > 0
    llm.cache.check()


def test_disk_blocks_expire(lively, tmp_path):
    llm = engine(lively, host_blocks=1, disk_dir=str(tmp_path / "kv"), disk_ttl_s=0.05)
    [prompt] = prompts(1, seed=5, shared=40)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    llm.generate([prompt], params)
    flood(llm, seed=6)
    assert list((tmp_path / "kv").glob("*.safetensors")), "blocks should be on disk"
    time.sleep(0.1)
    again = llm.generate([prompt], params)[0]
    assert llm.cache.stats["restored_disk"] == 0 and again.num_cached_tokens < 40
    llm.cache.check()
