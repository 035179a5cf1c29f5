"""greylens.serve_hooks: a split-inference engine that computes SAE features, probe scores and
reasoning paths inside the forward pass it serves, with its KV cache left intact.

    from serve_hooks import LLM, SamplingParams
    llm = LLM("smollm2-135m", saes=["out/sae/blocks.15.hook_resid_post"],
              probes=["out/probes/code"])
    out = llm.generate(["def f(x):"], SamplingParams(max_tokens=32))[0]
    out.text, out.features.codes, out.features.triggers

The engine, one module per stage (nano-vllm's layout):

    config         EngineConfig: every knob in one dataclass
    sequence       Sequence (a request in flight) and SamplingParams
    block_manager  BlockManager: device KV blocks, free list and reference counts
    prefix_cache   PrefixCache: token trie over full blocks, host/disk tiers, LRU, feature pages
    kv_cache       KVCache: the bytes of the device pool and of the host and disk tiers
    scheduler      continuous batching under a token budget, chunked prefill, preemption
    context        StepContext: which rows of a step's flattened batch belong to which request
    model_runner   the flattened forward with paged attention and TransformerLens hook points
    engine         LLMEngine: add requests, step until done; P/D handoff and import
    engine_hook    EngineHook: the one interface through which code runs inside the engine
    llm            LLM: the engine in one call (vLLM's offline API)

What runs inside it: `hook.FeatureHook` (SAE codes, probe scores, steering, feature pages
beside cached KV), `features.RequestFeatures` (a request's per-token results), `paths`
(reasoning paths of generated tokens), `harvest.TrafficHarvester` (an activation store from live
traffic). Around it: `disagg` (prefill and decode engines in separate processes), `server` and
`async_engine` (an OpenAI-compatible HTTP server: `python -m serve_hooks serve`), and
`vllm_plugin` (the same features inside vLLM, importing only torch and safetensors).

Names exported here load on first use, so `import serve_hooks.vllm_plugin` in vLLM's
environment does not pull in the engine and its dependencies.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "LLM": "serve_hooks.llm",
    "LLMEngine": "serve_hooks.engine",
    "RequestOutput": "serve_hooks.engine",
    "EngineConfig": "serve_hooks.config",
    "SamplingParams": "serve_hooks.sequence",
    "EngineHook": "serve_hooks.engine_hook",
    "FeatureHook": "serve_hooks.hook",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'serve_hooks' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
