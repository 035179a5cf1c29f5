"""The engine against transformers' `generate`: greedy outputs token-identical in every mode."""

from __future__ import annotations

import pytest

from serve_hooks.config import EngineConfig
from serve_hooks.engine import LLMEngine
from serve_hooks.sequence import SamplingParams
from tests.serve_hooks.conftest import hf_greedy, prompts

N_NEW = 12
GREEDY = SamplingParams(max_tokens=N_NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def references(lively):
    cases = prompts(6, seed=0) + prompts(4, seed=1, shared=37)
    return cases, [hf_greedy(lively, p, N_NEW) for p in cases]


def engine(model, **settings) -> LLMEngine:
    base = dict(model="tiny", num_blocks=128, block_size=4, max_num_batched_tokens=64)
    return LLMEngine(EngineConfig(**{**base, **settings}), model)


@pytest.mark.parametrize(
    "settings",
    [
        {},  # prefix cache on, chunked prefill on, everything fits
        {"enable_prefix_cache": False},
        {"max_num_batched_tokens": 7},  # prompts split into many chunks, mixed with decodes
        {"chunked_prefill": False, "max_num_batched_tokens": 128},
        {"max_num_seqs": 2},
    ],
    ids=["default", "no-prefix-cache", "chunked-7", "no-chunking", "two-at-a-time"],
)
def test_greedy_equals_hf_generate(lively, references, settings):
    cases, expected = references
    llm = engine(lively, **settings)
    outs = llm.generate(cases, GREEDY)
    assert [o.token_ids for o in outs] == expected
    llm.cache.check()
    assert llm.blocks.num_available == llm.blocks.num_blocks, (
        "every block is free or evictable at the end"
    )


def test_forced_preemption_keeps_outputs(lively, references):
    cases, expected = references
    # 96 slots for 10 requests of up to 88 tokens.
    llm = engine(lively, num_blocks=24, max_num_batched_tokens=32)
    seqs = [llm.add_request(p, GREEDY) for p in cases]
    done = {}
    while llm.has_unfinished():
        for out in llm.step():
            if out.finished:
                done[out.seq_id] = out.token_ids
        llm.cache.check()
    assert sum(s.num_preemptions for s in seqs) > 0, "the pool was meant to be too small"
    assert [done[s.seq_id] for s in seqs] == expected


def test_prefix_cache_hits_and_namespaces(lively, references):
    cases, expected = references
    llm = engine(lively)
    first = llm.generate(cases[6:7], GREEDY)[0]
    assert first.num_cached_tokens == 0
    again = llm.generate(cases[7:10], GREEDY)  # share 37 tokens with cases[6]: 9 full blocks of 4
    assert all(o.num_cached_tokens == 36 for o in again)
    assert [o.token_ids for o in again] == expected[7:10]
    other_key = llm.add_request(cases[7], GREEDY, cache_key="steered")
    while llm.has_unfinished():
        llm.step()
    assert other_key.num_prefix_hit == 0, "a different cache key must never reuse these blocks"
    whole = llm.generate([cases[6]], GREEDY)[0]  # fully cached prompt: the last block is recomputed
    assert (
        whole.num_cached_tokens == (len(cases[6]) - 1) // 4 * 4 and whole.token_ids == expected[6]
    )


def test_sampling_is_seeded_and_batch_independent(lively, references):
    cases, _ = references
    params = SamplingParams(
        max_tokens=8, temperature=0.9, top_p=0.9, top_k=50, seed=123, ignore_eos=True
    )
    alone = engine(lively).generate([cases[0]], params)[0].token_ids
    crowded = (
        engine(lively, max_num_batched_tokens=9)
        .generate(cases[:5], [params] + [GREEDY] * 4)[0]
        .token_ids
    )
    assert alone == crowded
    other_seed = SamplingParams(**{**params.__dict__, "seed": 7})
    assert engine(lively).generate([cases[0]], other_seed)[0].token_ids != alone
    top1 = SamplingParams(max_tokens=N_NEW, temperature=1.0, top_k=1, ignore_eos=True, seed=0)
    assert engine(lively).generate([cases[1]], top1)[0].token_ids == references[1][1]


def test_stop_conditions(lively, references):
    cases, expected = references
    llm = engine(lively)
    stop_id = expected[0][3]
    out = llm.generate(
        [cases[0]], SamplingParams(max_tokens=N_NEW, stop_token_ids=[stop_id], ignore_eos=True)
    )[0]
    assert (
        out.token_ids == expected[0][: expected[0].index(stop_id) + 1]
        and out.finish_reason == "stop"
    )
    full_text = llm.tokenizer.decode(expected[0], skip_special_tokens=True)
    needle = llm.tokenizer.decode(expected[0][7:9], skip_special_tokens=True)  # appears mid-output
    assert needle and needle in full_text
    out = llm.generate(
        [cases[0]], SamplingParams(max_tokens=N_NEW, stop=[needle], ignore_eos=True)
    )[0]
    assert out.finish_reason == "stop" and needle not in out.text and full_text.startswith(out.text)
    out = llm.generate([cases[0]], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert out.token_ids == expected[0][:3] and out.finish_reason == "length"


def test_bad_requests_are_refused_up_front(lively):
    llm = engine(lively, num_blocks=8, max_model_len=64)
    with pytest.raises(ValueError, match="empty"):
        llm.add_request([])
    with pytest.raises(ValueError, match="context limit"):
        llm.add_request(list(range(3, 70)))
    with pytest.raises(ValueError, match="KV blocks"):
        llm.add_request(list(range(3, 20)), SamplingParams(max_tokens=40))
    with pytest.raises(ValueError, match="token ids"):
        llm.add_request([5, 10**9])
    for bad in (
        {"temperature": -1},
        {"top_p": 0},
        {"top_k": -2},
        {"max_tokens": 0},
        {"stop": [""]},
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)
    assert not llm.has_unfinished()


def test_abort_frees_blocks(lively, references):
    cases, _ = references
    llm = engine(lively)
    keep, drop = llm.add_request(cases[0], GREEDY), llm.add_request(cases[1], GREEDY)
    llm.step()
    llm.abort(drop.seq_id)
    while llm.has_unfinished():
        llm.step()
    assert keep.is_finished and drop.finish_reason == "abort"
    llm.cache.check()
    assert llm.blocks.num_available == llm.blocks.num_blocks
