"""The serving hook: features inside the engine equal an offline pass, survive prefix hits,
chunking, preemption and tier spills, never change outputs, and steering keeps its own KV."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open

from probes.activations import Features, Ragged
from probes.probe import Probe
from probes.train import fit_probe
from sae.hooks import capture
from sae.sae import SAE, SAEConfig
from serve_hooks import LLM
from serve_hooks.config import EngineConfig
from serve_hooks.engine import LLMEngine
from serve_hooks.hook import FeatureHook
from serve_hooks.sequence import SamplingParams
from tests.serve_hooks.conftest import prompts

HOOK = "blocks.1.hook_resid_post"
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def sae(lively):
    torch.manual_seed(0)
    return SAE(SAEConfig(d_in=lively.d_model, n_latents=96, k=6, hook=HOOK, model="tiny"))


@pytest.fixture(scope="module")
def probes(lively, sae):
    g = torch.Generator().manual_seed(0)
    linear = Probe(
        "linear",
        HOOK,
        lively.d_model,
        "mean",
        torch.randn(lively.d_model, generator=g),
        0.3,
        name="dense",
    )
    x = torch.randn(40, lively.d_model, generator=g)
    y = torch.arange(8) % 2
    feats = Features(Ragged(x, torch.arange(0, 41, 5)), sae.encode(x), 96)
    sparse = fit_probe(
        "sparse", feats, y, hook=HOOK, aggregation="mean", k=4, sae="-", name="sparse", l2=0.1
    )
    return [linear, sparse]


def engine(model, **settings) -> LLMEngine:
    base = dict(model="tiny", num_blocks=128, block_size=4, max_num_batched_tokens=64)
    return LLMEngine(EngineConfig(**{**base, **settings}), model)


def run(llm: LLMEngine, cases, params=PARAMS, key=""):
    seqs = [llm.add_request(p, params, cache_key=key) for p in cases]
    while llm.has_unfinished():
        llm.step()
    return seqs


def offline(model, sae, probes, ids: list[int]):
    """Dense SAE code and probe scores of every token of `ids`, from a plain HF forward."""
    x = capture(model, torch.tensor([ids]), [HOOK])[HOOK][0]
    code = sae.encode(x)
    return code.to_dense(96), {p.name: p.token_scores(x, code) for p in probes}


def check_equal(model, sae, probes, hook, seq) -> None:
    ids = seq.token_ids[:-1]  # the last sampled token was never fed to the model
    dense, scores = offline(model, sae, probes, ids)
    got = hook.features(seq.seq_id)
    assert got is not None and got.n == len(ids)
    idx, val = got.codes[HOOK]
    ours = torch.zeros(len(ids), 96).scatter_(1, idx[: len(ids)], val[: len(ids)])
    top = dense.topk(6, dim=1).values  # the hook keeps top_n = 6 = k: the whole code
    assert torch.allclose(ours.sort(dim=1, descending=True).values[:, :6], top, atol=1e-4)
    assert torch.allclose(ours, dense, atol=1e-4)
    for name, expected in scores.items():
        assert torch.allclose(got.scores[name][: len(ids)], expected, atol=1e-4), name


@pytest.mark.parametrize(
    "settings",
    [{}, {"max_num_batched_tokens": 5}, {"num_blocks": 20, "max_num_batched_tokens": 32}],
    ids=["plain", "chunked", "preempted"],
)
def test_features_equal_offline_and_outputs_unchanged(lively, sae, probes, settings):
    cases = prompts(4, seed=8, shared=14) + prompts(3, seed=9)
    plain = [s.output_ids for s in run(engine(lively, **settings), cases)]
    llm = engine(lively, **settings)
    hook = FeatureHook(llm, saes=[sae], probes=probes, top_n=6)
    first = run(llm, cases[:4])
    second = run(llm, cases[4:] + cases[:2])  # the last two hit the prefix cache, pages included
    assert [s.output_ids for s in first + second[:3]] == plain, (
        "read-only hooks never change outputs"
    )
    assert all(s.num_prefix_hit > 0 for s in second[3:])
    for seq in first + second:
        check_equal(lively, sae, probes, hook, seq)
    if "num_blocks" in settings:
        assert llm.scheduler.num_preemptions > 0


def test_kv_hit_without_pages_recomputes(lively, sae, probes):
    llm = engine(lively)
    [shared] = prompts(1, seed=10, shared=20)
    run(llm, [shared])  # cached KV, but no hook was attached: no feature pages
    hook = FeatureHook(llm, saes=[sae], probes=probes, top_n=6)
    [seq] = run(llm, [shared[:-1] + [7]])
    assert seq.num_prefix_hit == 0, "blocks without this version's pages must not be matched"
    check_equal(lively, sae, probes, hook, seq)
    [again] = run(llm, [shared[:-1] + [9]])
    assert again.num_prefix_hit > 0
    check_equal(lively, sae, probes, hook, again)


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_pages_follow_blocks_to_host_and_disk_and_back(lively, sae, probes, tier, tmp_path):
    disk = {"host_blocks": 2, "disk_dir": str(tmp_path)} if tier == "disk" else {"host_blocks": 64}
    llm = engine(lively, num_blocks=20, **disk)
    hook = FeatureHook(llm, saes=[sae], probes=probes, top_n=6)
    [shared] = prompts(1, seed=11, shared=36)
    run(llm, [shared])
    # Push the idle prefix out of the pool (to host memory, then disk).
    run(llm, prompts(4, seed=12))
    if tier == "disk":
        spilled = [
            n for root in llm.cache.roots.values() for n in root.subtree() if n.tier == "disk"
        ]
        assert spilled and all(list(n.pages.values()) == [None] for n in spilled), (
            "page tensors left memory"
        )
        assert any(
            k.startswith("extra/")
            for k in safe_open(next(tmp_path.glob("*.safetensors")), "pt").keys()
        )
    [seq] = run(llm, [shared[:-2] + [5, 6]])
    assert llm.cache.stats[f"restored_{tier}"] > 0 and seq.num_prefix_hit > 0
    check_equal(lively, sae, probes, hook, seq)


def test_steering_has_its_own_cache_namespace(lively, sae, probes):
    llm = engine(lively)
    hook = FeatureHook(llm, saes=[sae], probes=probes, top_n=6)
    vector = torch.randn(lively.d_model, generator=torch.Generator().manual_seed(3)) * 4
    key = hook.steer(vector, HOOK)
    assert key == hook.steer(vector.clone(), HOOK), "the key is a fingerprint of the intervention"
    [case] = prompts(1, seed=13, shared=12)
    steered = llm.add_request(case, PARAMS, cache_key=key)
    plain = llm.add_request(case, PARAMS)
    llm.step()
    assert not set(steered.block_table) & set(plain.block_table), (
        "steered and plain requests share no KV block"
    )
    while llm.has_unfinished():
        llm.step()
    reference = _greedy_with_added(lively, case, vector, 6)
    assert steered.output_ids == reference and plain.output_ids != reference
    with pytest.raises(ValueError, match="residual"):
        hook.steer(vector, "blocks.1.hook_attn_out")


def _greedy_with_added(model, prompt: list[int], vector: torch.Tensor, n: int) -> list[int]:
    handle = model.fast.model.layers[1].register_forward_hook(
        lambda m, a, out: (out[0] + vector, *out[1:]) if isinstance(out, tuple) else out + vector
    )
    try:
        ids = list(prompt)
        for _ in range(n):
            ids.append(int(model.fast(torch.tensor([ids])).logits[0, -1].argmax()))
    finally:
        handle.remove()
    return ids[len(prompt) :]


def test_llm_returns_features_and_steers(lively, sae, probes):
    llm = LLM(
        lively,
        saes=[sae],
        probes=probes,
        top_n=6,
        num_blocks=64,
        block_size=4,
        max_num_batched_tokens=16,
    )
    cases = prompts(3, seed=14)
    outs = llm.generate(cases, PARAMS)
    for case, out in zip(cases, outs, strict=True):
        dense, scores = offline(lively, sae, probes, case + out.token_ids[:-1])
        assert out.features.n == len(case) + len(out.token_ids) - 1
        idx, val = out.features.codes[HOOK]
        assert torch.allclose(
            torch.zeros_like(dense).scatter_(1, idx[: out.features.n], val[: out.features.n]),
            dense,
            atol=1e-4,
        )
        assert set(out.features.to_json()["probes"]) == {"dense", "sparse"}
    vector = torch.randn(lively.d_model, generator=torch.Generator().manual_seed(5)) * 4
    [steered] = llm.generate(cases[:1], PARAMS, steering=(vector, HOOK))
    assert steered.token_ids == _greedy_with_added(lively, cases[0], vector, 6)


def test_cancelled_requests_leave_no_state(lively, sae, probes):
    llm = engine(lively)
    hook = FeatureHook(llm, saes=[sae], probes=probes, top_n=6)
    seq = llm.add_request(prompts(1, seed=18)[0], PARAMS)
    llm.step()
    assert hook.features(seq.seq_id) is not None
    llm.abort(seq.seq_id)
    assert hook.features(seq.seq_id) is None and not llm.has_unfinished()


def test_only_watched_requests_pay(lively, sae, probes):
    """watch_all=False (the server): unwatched requests encode nothing and use any cached KV;
    a watched request does not match blocks without pages, then leaves pages others reuse."""
    llm = engine(lively)
    hook = FeatureHook(llm, saes=[sae], probes=probes, top_n=6, watch_all=False)
    encoded = []
    real_encode = sae.encode
    sae.encode = lambda x: encoded.append(x.shape[0]) or real_encode(x)
    try:
        [shared] = prompts(1, seed=20, shared=20)
        [cold] = run(llm, [shared])
        assert hook.features(cold.seq_id) is None and encoded == [], (
            "an unwatched request encodes nothing"
        )
        watched = llm.add_request(shared[:-1] + [11], PARAMS)
        hook.watch(watched.seq_id)
        other = llm.add_request(shared[:-1] + [12], PARAMS)  # unwatched, in the same steps
        while llm.has_unfinished():
            llm.step()
        assert watched.num_prefix_hit == 0, (
            "cached blocks without pages are recomputed for a watched request"
        )
        assert other.num_prefix_hit > 0, "an unwatched request matches them as usual"
        assert sum(encoded) == len(watched.token_ids) - 1, (
            "only the watched request's rows were encoded"
        )
        check_equal(lively, sae, probes, hook, watched)
        assert hook.features(other.seq_id) is None
        again = llm.add_request(shared[:-1] + [13], PARAMS)
        hook.watch(again.seq_id)
        while llm.has_unfinished():
            llm.step()
        assert again.num_prefix_hit > 0, "the watched request left pages that the next one reuses"
        check_equal(lively, sae, probes, hook, again)
    finally:
        sae.encode = real_encode


def test_two_encoders_at_one_hook_are_refused(lively, sae):
    with pytest.raises(ValueError, match="one per hook"):
        FeatureHook(engine(lively), saes=[sae, sae])


def test_a_sparse_probe_on_another_sae_is_refused(lively, sae, probes, tmp_path):
    from sae.io import save_sae

    mine, other = save_sae(sae, tmp_path / "mine" / HOOK), save_sae(sae, tmp_path / "other" / HOOK)
    sparse = dataclasses.replace(probes[1], sae=str(mine))
    FeatureHook(engine(lively), saes=[mine], probes=[sparse])  # its own SAE: fine
    with pytest.raises(ValueError, match="probe 'sparse' reads the code of"):
        FeatureHook(engine(lively), saes=[other], probes=[sparse])
