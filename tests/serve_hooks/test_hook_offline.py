"""The serving hook against the offline tools: per-token features and probe scores equal what
`Lens` computes on the full text (prefix hits, chunked prefill, preemption, the P/D handoff), and
reasoning paths of generated tokens equal `graphs.explain.Explainer` on the same tokens."""

from __future__ import annotations

import pytest
import torch

from probes.activations import Features, Ragged
from probes.lens import Lens
from probes.probe import Probe
from probes.train import fit_probe
from sae.io import save_sae
from sae.sae import SAE, SAEConfig
from serve_hooks import LLM
from serve_hooks.config import EngineConfig
from serve_hooks.engine import LLMEngine
from serve_hooks.hook import FeatureHook
from serve_hooks.sequence import SamplingParams
from tests.graphs.conftest import tiny_graph  # noqa: F401  (a session fixture: trained graph)
from tests.serve_hooks.conftest import prompts

HOOK = "blocks.1.hook_resid_post"
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def kit(lively, tmp_path_factory):
    """An SAE on disk, a dense and a sparse probe that reads it, and a Lens over all three."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=lively.d_model, n_latents=96, k=6, hook=HOOK, model="tiny"))
    directory = save_sae(sae, tmp_path_factory.mktemp("sae") / HOOK)
    g = torch.Generator().manual_seed(0)
    dense = Probe(
        "linear",
        HOOK,
        lively.d_model,
        "mean",
        torch.randn(lively.d_model, generator=g),
        0.3,
        name="dense",
    )
    x = torch.randn(40, lively.d_model, generator=g)
    feats = Features(Ragged(x, torch.arange(0, 41, 5)), sae.encode(x), 96)
    sparse = fit_probe(
        "sparse",
        feats,
        torch.arange(8) % 2,
        hook=HOOK,
        aggregation="mean",
        k=4,
        sae=str(directory),
        name="sparse",
        l2=0.1,
    )
    lens = Lens(lively, probes=[dense, sparse], saes=[directory], top_n=6)
    return directory, [dense, sparse], lens


def with_bos(model, cases: list[list[int]]) -> list[list[int]]:
    return [[model.tokenizer.bos_token_id, *case] for case in cases]


def assert_equals_lens(lens: Lens, features, ids: list[int]) -> None:
    """ids: every token the engine read (BOS first). Lens scores ids[1:] on its own forward."""
    [ref] = lens.score([ids[1:]])
    n = len(ids) - 1
    assert features is not None and features.n == len(ids)
    idx, val = features.codes[HOOK]
    ours = torch.zeros(n, 96).scatter_(1, idx[1 : n + 1], val[1 : n + 1])
    theirs = torch.zeros(n, 96).scatter_(
        1, torch.tensor(ref.features[HOOK]["indices"]), torch.tensor(ref.features[HOOK]["values"])
    )
    assert theirs.count_nonzero() > 0 and torch.allclose(ours, theirs, atol=1e-4)
    for name, result in ref.probes.items():
        assert torch.allclose(
            features.scores[name][1 : n + 1], torch.tensor(result.token_scores), atol=1e-4
        ), name


@pytest.mark.parametrize(
    "settings",
    [{}, {"max_num_batched_tokens": 5}, {"num_blocks": 24, "max_num_batched_tokens": 32}],
    ids=["prefix-hits", "chunked", "preempted"],
)
def test_features_equal_lens_on_the_full_text(lively, kit, settings):
    directory, probes, lens = kit
    llm = LLMEngine(
        EngineConfig(
            **{
                "model": "tiny",
                "num_blocks": 128,
                "block_size": 4,
                "max_num_batched_tokens": 64,
                **settings,
            }
        ),
        lively,
    )
    hook = FeatureHook(llm, saes=[directory], probes=probes, top_n=6)
    cases = with_bos(lively, prompts(6, seed=30, shared=14))
    seqs = [llm.add_request(c, PARAMS) for c in cases[:2]]
    while llm.has_unfinished():
        llm.step()
    # All at once: they hit the prefix and crowd the pool.
    seqs += [llm.add_request(c, PARAMS) for c in cases[2:]]
    while llm.has_unfinished():
        llm.step()
    assert all(s.num_prefix_hit > 0 for s in seqs[2:])
    if "num_blocks" in settings:
        assert llm.scheduler.num_preemptions > 0
    for seq in seqs:
        assert_equals_lens(lens, hook.release(seq.seq_id), seq.token_ids[:-1])


def split_run(model, case: list[int], **hook_settings):
    """Prefill `case` on one engine, hand it over, decode on another (both hooked, in-process: the
    same Handoff that serve_hooks.disagg sends between processes). -> (decode hook, seq, extras)."""
    config = EngineConfig(model="tiny", num_blocks=64, block_size=4, max_num_batched_tokens=8)
    prefill, decode = LLMEngine(config, model), LLMEngine(config, model)
    hooks = [FeatureHook(e, **hook_settings) for e in (prefill, decode)]
    prefill.add_request(case, PARAMS, prefill_only=True)
    outs = []
    while prefill.has_unfinished():
        outs += prefill.step()
    [handed] = [o for o in outs if o.handoff is not None]
    seq = decode.add_prefilled(case, handed.token_ids, handed.handoff)
    while decode.has_unfinished():
        decode.step()
    assert len(seq.output_ids) == PARAMS.max_tokens
    return hooks[1], seq, handed.handoff.extras


def test_features_equal_lens_across_the_prefill_decode_handoff(lively, kit):
    directory, probes, lens = kit
    [case] = with_bos(lively, prompts(1, seed=31))
    hook, seq, extras = split_run(lively, case, saes=[directory], probes=probes, top_n=6)
    assert any(name.startswith("codes.") for name in extras), "feature pages travel with the KV"
    assert_equals_lens(lens, hook.release(seq.seq_id), seq.token_ids[:-1])


def assert_paths_equal_offline(hook: FeatureHook, features, ids: list[int], n_prompt: int) -> int:
    """Every generated token's paths (all of them, not the top 5) equal the Explainer's on the
    same tokens; returns how many paths were compared."""
    explainer = hook.paths.explainer
    ours = hook.explain(features, ids, top=10_000)
    assert [p["position"] for p in ours] == list(range(n_prompt - 1, len(ids) - 1))
    result, graph_code, target = explainer.codes(torch.tensor([ids]))  # row r = position r + 1
    predicted = torch.tensor(ids[2:] + [0])  # row r predicts position r + 2
    offline = explainer.predictions(
        graph_code.code, target, predicted, result.final_rms[0, 1:], top=10_000
    )
    n_paths = 0
    for mine in ours:
        row = mine["position"] - 1
        assert mine["token_id"] == ids[row + 2]
        for kind, key in (("paths", ("source", "target")), ("direct", ("feature",))):
            got = {tuple(e[k] for k in key): e["weight"] for e in mine[kind]}
            want = {tuple(e[k] for k in key): e["weight"] for e in offline[row][kind]}
            assert got.keys() == want.keys(), kind
            assert all(abs(got[k] - want[k]) <= 1e-3 * max(1.0, abs(want[k])) for k in got), kind
            n_paths += len(got) if kind == "paths" else 0
    return n_paths


def test_paths_of_generated_tokens_equal_the_offline_explainer(tiny, tiny_graph):  # noqa: F811
    llm = LLM(
        tiny,
        graph=tiny_graph.graph,
        transition=tiny_graph.transition,
        top_n=4,
        num_blocks=64,
        block_size=4,
        max_num_batched_tokens=8,
    )
    cases = with_bos(tiny, prompts(2, seed=32))
    n_paths = 0
    for case, out in zip(cases, llm.generate(cases, PARAMS), strict=True):
        assert [p["position"] for p in out.features.predictions] == list(
            range(len(case) - 1, len(case) + 5)
        )
        assert all(len(p["paths"]) <= 5 for p in out.features.predictions), "LLM keeps the top 5"
        n_paths += assert_paths_equal_offline(
            llm.hook, out.features, case + out.token_ids, len(case)
        )
    assert n_paths > 0, "the graph produced paths to check"


def test_paths_survive_the_prefill_decode_handoff(tiny, tiny_graph):  # noqa: F811
    [case] = with_bos(tiny, prompts(1, seed=34))
    hook, seq, extras = split_run(
        tiny, case, graph=tiny_graph.graph, transition=tiny_graph.transition, top_n=4
    )
    assert any(name.startswith("paths.") for name in extras), "the first prediction's inputs travel"
    assert assert_paths_equal_offline(hook, hook.release(seq.seq_id), seq.token_ids, len(case)) > 0


def test_llm_reports_pooled_probe_scores_and_triggers_like_lens(lively, kit):
    directory, probes, lens = kit
    llm = LLM(
        lively,
        saes=[directory],
        probes=probes,
        top_n=6,
        num_blocks=64,
        block_size=4,
        max_num_batched_tokens=8,
    )
    cases = with_bos(lively, prompts(3, seed=33))
    for case, out in zip(cases, llm.generate(cases, PARAMS), strict=True):
        [ref] = lens.score([(case + out.token_ids)[1:-1]])
        assert set(out.features.triggers) == set(ref.probes)
        for name, result in ref.probes.items():
            got = out.features.triggers[name]
            assert abs(got["score"] - result.score) < 1e-4 and got["fired"] == result.fired
            assert abs(got["probability"] - result.probability) < 1e-5
