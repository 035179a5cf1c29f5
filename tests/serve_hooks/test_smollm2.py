"""The engine on the real model (slow): greedy outputs token-identical to transformers
`generate`."""

from __future__ import annotations

import pytest

from serve_hooks.config import EngineConfig
from serve_hooks.engine import LLMEngine
from serve_hooks.sequence import SamplingParams
from tests.serve_hooks.conftest import hf_greedy

N_NEW = 32


@pytest.mark.slow
def test_smollm2_greedy_equals_hf_with_prefix_cache_and_chunks(smollm2):
    tok = smollm2.tokenizer
    system = tok("You are a careful assistant. Answer briefly and precisely, in plain English.\n")[
        "input_ids"
    ]
    prompts = [
        tok("The capital of France is")["input_ids"],
        system + tok("Question: why is the sky blue?\nAnswer:")["input_ids"],
        system + tok("Question: what is a prime number?\nAnswer:")["input_ids"],
    ]
    expected = [hf_greedy(smollm2, p, N_NEW) for p in prompts]
    engine = LLMEngine(
        EngineConfig(model="smollm2-135m", num_blocks=64, block_size=8, max_num_batched_tokens=24),
        smollm2,
    )
    params = SamplingParams(max_tokens=N_NEW, ignore_eos=True)
    # Chunked prefill (24-token budget) mixed with decodes.
    first = engine.generate(prompts[:2], params)
    second = engine.generate(prompts[2:], params)  # hits the cached system prompt
    assert [o.token_ids for o in first + second] == expected
    assert second[0].num_cached_tokens >= len(system) // 8 * 8 > 0
    engine.cache.check()


@pytest.mark.slow
def test_smollm2_greedy_equals_hf_after_forced_preemption(smollm2):
    tok = smollm2.tokenizer
    prompts = [
        tok(t)["input_ids"]
        for t in (
            "Once upon a time, in a small village,",
            "The three laws of motion are",
            "To make a cup of tea, first",
        )
    ]
    expected = [hf_greedy(smollm2, p, N_NEW) for p in prompts]
    # 6 blocks of 8 slots: never room for all three requests at once, so the newest is recomputed
    engine = LLMEngine(
        EngineConfig(model="smollm2-135m", num_blocks=6, block_size=8, enable_prefix_cache=False),
        smollm2,
    )
    outs = engine.generate(prompts, SamplingParams(max_tokens=N_NEW, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
