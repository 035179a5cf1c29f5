"""The engine on every family it serves, driven by the registry: greedy outputs token-identical
to transformers' `generate` (with prefix-cache hits, chunked prefill and preemption), every hook
point equal to the HF forward, and the feature hook's SAE codes equal to SAE-on-harvest codes.
Families the engine does not serve (GPT-2, GPT-NeoX) are refused at construction."""

from __future__ import annotations

import pytest
import torch

from sae.families import FAMILIES
from sae.hooks import capture
from sae.models import LoadedModel, load_model
from sae.sae import SAE, SAEConfig
from serve_hooks import LLM
from serve_hooks.async_engine import AsyncEngine
from serve_hooks.config import EngineConfig
from serve_hooks.context import StepContext
from serve_hooks.engine import LLMEngine
from serve_hooks.engine_hook import EngineHook
from serve_hooks.hook import FeatureHook
from serve_hooks.layers import LAYERS
from serve_hooks.model_runner import HOOK_POINTS
from serve_hooks.sequence import SamplingParams
from tests.serve_hooks.conftest import hf_greedy, prompts

ENGINE = [f.name for f in FAMILIES.values() if f.engine]
OTHERS = [f.name for f in FAMILIES.values() if not f.engine]
N_NEW = 8
GREEDY = SamplingParams(max_tokens=N_NEW, ignore_eos=True)
SHARED = 21  # tokens the last three prompts share: 5 full blocks of 4 hit the prefix cache
LAYER = 1


def test_every_served_family_has_an_engine_layer():
    assert set(LAYERS) == set(ENGINE)


@pytest.fixture(scope="module", params=ENGINE)
def case(request) -> tuple[LoadedModel, list[list[int]], list[list[int]]]:
    """A tiny model of the family with every norm weight and bias moved off its init (so Gemma's
    (1 + w), Qwen2's biases and the q/k norms all count), its prompts (3-60 tokens, longer than
    the tiny sliding window of 8) and transformers' greedy continuations."""
    model = load_model(f"tiny-{request.param}")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.fast.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    cases = prompts(4, seed=0) + prompts(3, seed=1, shared=SHARED)
    return model, cases, [hf_greedy(model, p, N_NEW) for p in cases]


def engine(model: LoadedModel, **settings) -> LLMEngine:
    base = dict(model=model.name, num_blocks=128, block_size=4, max_num_batched_tokens=64)
    return LLMEngine(EngineConfig(**{**base, **settings}), model)


def run(llm: LLMEngine, cases: list[list[int]]) -> list:
    seqs = [llm.add_request(p, GREEDY) for p in cases]
    while llm.has_unfinished():
        llm.step()
        llm.cache.check()
    return seqs


@pytest.mark.parametrize(
    "settings",
    [{}, {"max_num_batched_tokens": 8}, {"num_blocks": 22, "max_num_batched_tokens": 32}],
    ids=["prefix-cache", "chunked-8", "preempted"],
)
def test_greedy_equals_hf_generate(case, settings):
    model, cases, expected = case
    llm = engine(model, **settings)
    first = run(llm, cases[:5])
    second = run(llm, cases[5:])  # their shared prefix is cached by cases[4]
    assert [s.output_ids for s in first + second] == expected
    if "num_blocks" in settings:
        assert llm.scheduler.num_preemptions > 0, "the pool was meant to be too small"
    else:
        assert all(s.num_prefix_hit == SHARED // 4 * 4 for s in second)


def test_logits_equal_hf_forward(case):
    """Greedy tokens cannot see a monotone final soft-cap (Gemma); the logits do."""
    model, cases, _ = case
    llm = engine(model, max_num_batched_tokens=7)
    logits, forward = [], llm.runner.forward
    llm.runner.forward = lambda ids, ctx: logits.append(forward(ids, ctx)) or logits[-1]
    [seq] = run(llm, cases[5:6])
    with torch.no_grad():
        expected = model.fast(torch.tensor([seq.token_ids[:-1]])).logits[0]  # [seq, vocab]
    n_prompt = len(cases[5])
    torch.testing.assert_close(torch.cat(logits), expected[n_prompt - 1 :], atol=1e-4, rtol=1e-4)


class Recorder(EngineHook):
    """Keeps every row of every hook point of one layer, by request and position."""

    def __init__(self) -> None:
        self.points = frozenset(f"blocks.{LAYER}.{p}" for p in HOOK_POINTS)
        self.rows: dict[tuple[int, str], dict[int, torch.Tensor]] = {}

    def on_layer(self, point: str, rows: torch.Tensor, ctx: StepContext) -> None:
        cu = ctx.cu_seqlens_q.tolist()
        for i, seq in enumerate(ctx.seqs):
            kept = self.rows.setdefault((seq.seq_id, point), {})
            for j, row in enumerate(rows[cu[i] : cu[i + 1]]):
                kept[ctx.starts[i] + j] = row.clone()


def hf_points(model: LoadedModel, ids: list[int]) -> dict[str, torch.Tensor]:
    """The five hook points of LAYER from an HF forward, located by the family entry (the module
    whose output is what attention / the MLP add to the residual)."""
    family, block = model.family, model.fast.model.layers[LAYER]
    seen: dict[str, torch.Tensor] = {}

    def keep(point: str):
        return lambda m, a, out: seen.__setitem__(point, out[0] if isinstance(out, tuple) else out)

    modules = {
        "hook_attn_out": getattr(block, family.attn_out or family.attn),
        "hook_mlp_out": getattr(block, family.mlp_out or family.mlp),
        "hook_resid_post": block,
    }
    handles = [m.register_forward_hook(keep(p)) for p, m in modules.items()]
    handles.append(block.register_forward_pre_hook(lambda m, a: seen.update(pre=a[0])))
    with torch.no_grad():
        model.fast(torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    seen["hook_resid_pre"] = seen.pop("pre")
    seen["hook_resid_mid"] = seen["hook_resid_pre"] + seen["hook_attn_out"]
    return {p: t[0] for p, t in seen.items()}  # [seq, d_model] each


def test_hook_points_equal_hf_forward(case):
    model, cases, _ = case
    llm = engine(model, max_num_batched_tokens=7, enable_prefix_cache=False)
    recorder = Recorder()
    llm.attach(recorder)
    for seq in run(llm, cases[3:6]):
        ids = seq.token_ids[:-1]  # the last sampled token was never fed to the model
        expected = hf_points(model, ids)
        for point in HOOK_POINTS:
            got = recorder.rows[(seq.seq_id, f"blocks.{LAYER}.{point}")]
            assert sorted(got) == list(range(len(ids)))
            ours = torch.stack([got[p] for p in range(len(ids))])
            torch.testing.assert_close(ours, expected[point], atol=1e-4, rtol=1e-4, msg=point)


def test_feature_codes_equal_sae_on_harvest(case):
    model, cases, _ = case
    hook_name = f"blocks.{LAYER}.hook_resid_post"
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=model.d_model, n_latents=96, k=6, hook=hook_name, model=model.name))
    llm = engine(model, max_num_batched_tokens=7)
    hook = FeatureHook(llm, saes=[sae], top_n=6)
    seqs = run(llm, cases[4:5]) + run(llm, cases[5:])
    assert all(s.num_prefix_hit > 0 for s in seqs[1:]), "pages come back with cached blocks"
    for seq in seqs:
        ids = seq.token_ids[:-1]
        dense = sae.encode(capture(model, torch.tensor([ids]), [hook_name])[hook_name][0])
        idx, val = hook.features(seq.seq_id).codes[hook_name]
        ours = torch.zeros(len(ids), 96).scatter_(1, idx[: len(ids)], val[: len(ids)])
        torch.testing.assert_close(ours, dense.to_dense(96), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", OTHERS)
def test_other_families_are_refused_with_the_vllm_route(name):
    model = load_model(f"tiny-{name}")
    with pytest.raises(ValueError, match=rf"'{name}' family.*vLLM.*docs/vllm_plugin\.md"):
        LLM(model, num_blocks=8)
    with pytest.raises(ValueError, match="docs/vllm_plugin.md"):  # the server builds it so too
        AsyncEngine(lambda: LLMEngine(EngineConfig(model=model.name, num_blocks=8), model))
