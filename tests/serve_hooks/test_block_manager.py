"""Block accounting: the pool alone, and under random workloads with the prefix cache (no model)."""

from __future__ import annotations

import random

import pytest

from serve_hooks.block_manager import BlockManager
from serve_hooks.config import EngineConfig
from serve_hooks.kv_cache import KVCache
from serve_hooks.prefix_cache import HOST, PrefixCache
from serve_hooks.scheduler import Scheduler
from serve_hooks.sequence import SamplingParams, Sequence


def fake_run(
    scheduler: Scheduler, cache: PrefixCache, rng: random.Random, cancel_rate: float
) -> int:
    """Drive the scheduler without a model: each chunk 'computes', finishing chunks emit a token."""
    steps = 0
    while scheduler.has_work():
        scheduled = scheduler.schedule()
        assert scheduled, "the scheduler stalled with work left"
        for seq, n in scheduled:
            seq.num_computed += n
            cache.commit(seq)
        for seq, _ in scheduled:
            if seq.is_finished or seq.remaining:
                continue
            seq.output_ids.append(rng.randrange(3, 40))
            if len(seq.output_ids) >= seq.params.max_tokens:
                scheduler.finish(seq, "length")
        if rng.random() < cancel_rate and scheduler.running:
            scheduler.finish(rng.choice(scheduler.running), "abort")
        cache.check()
        steps += 1
    return steps


@pytest.mark.parametrize("seed", range(12))
def test_no_block_leaks_under_random_workloads(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    num_blocks = rng.randint(24, 80)
    host = rng.choice([0, 8])
    kv = KVCache(2, num_blocks, block_size, 1, 2, host_blocks=host) if host else None
    blocks = BlockManager(num_blocks, block_size)
    cache = PrefixCache(blocks, enabled=rng.random() < 0.8, kv=kv, host_blocks=host)
    cfg = EngineConfig(
        block_size=block_size,
        max_num_seqs=rng.randint(1, 8),
        max_num_batched_tokens=rng.randint(4, 48),
        chunked_prefill=True,
    )
    scheduler = Scheduler(cfg, blocks, cache)
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
    fake_run(scheduler, cache, rng, cancel_rate=0.05)
    assert all(r == 0 for r in blocks.ref), "a finished workload holds no references"
    assert blocks.num_available == num_blocks
    assert len(cache.host_free) + sum(1 for n in _nodes(cache) if n.tier == HOST) == host


def _nodes(cache: PrefixCache):
    for root in cache.roots.values():
        yield from root.subtree()[1:]


def test_blocks_move_between_free_used_and_idle():
    blocks = BlockManager(4, 2)
    seq = Sequence([1, 2, 3], SamplingParams())
    assert blocks.can_append(seq, 3) and not blocks.can_append(seq, 9)
    blocks.append(seq, 3)  # 3 tokens: 2 blocks
    first, second = seq.block_table
    blocks.keep(first)  # the cache keeps the full block
    other = Sequence([1, 2, 7], SamplingParams(), block_table=[first])
    blocks.share(first)
    assert blocks.free(seq) == [] and blocks.ref[first] == 1, "still used by `other`"
    assert second in blocks.free_blocks, "a block nobody keeps is free at once"
    assert blocks.free(other) == [first] and blocks.n_idle == 1
    assert blocks.num_available == 4 and len(blocks.free_blocks) == 3
    again = Sequence([1, 2, 8], SamplingParams(), block_table=[first])
    blocks.share(first)  # a prefix hit makes the idle block used again
    assert blocks.n_idle == 0 and blocks.num_available == 3
    assert blocks.free(again) == [first]
    blocks.let_go(first)  # evicted: plainly free
    assert blocks.n_idle == 0 and len(blocks.free_blocks) == 4
    blocks.check()
    blocks.free_blocks.clear()
    with pytest.raises(RuntimeError, match="no free or evictable"):
        blocks.take()
