"""Prefill/decode split across processes (gloo): the decode side continues exactly where
prefill stopped."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file

from serve_hooks.config import EngineConfig
from serve_hooks.disagg import DisaggregatedLLM
from serve_hooks.engine import LLMEngine
from serve_hooks.sequence import SamplingParams
from tests.serve_hooks.conftest import hf_greedy, prompts

SETTINGS = dict(num_blocks=96, block_size=4, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def weights(lively, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("weights") / "lively.safetensors"
    # lm_head is tied to the embedding: the receiving model rebuilds it.
    state = {
        k: v.contiguous().clone()
        for k, v in lively.fast.state_dict().items()
        if k != "lm_head.weight"
    }
    save_file(state, str(path))
    return str(path)


@pytest.mark.parametrize("n_prefill,n_decode", [(1, 2), (2, 1)])
def test_split_equals_one_engine(lively, weights, n_prefill, n_decode):
    cases = prompts(5, seed=3) + prompts(3, seed=4, shared=20)
    greedy = SamplingParams(max_tokens=10, ignore_eos=True)
    sampled = SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.8, top_p=0.95, seed=11)
    single = LLMEngine(EngineConfig(model="tiny", **SETTINGS), lively)
    expected_sampled = [o.token_ids for o in single.generate(cases[:3], sampled)]
    llm = DisaggregatedLLM(
        "tiny", n_prefill=n_prefill, n_decode=n_decode, weights=weights, **SETTINGS
    )
    try:
        outs = llm.generate(cases, greedy)
        assert [o["tokens"] for o in outs] == [hf_greedy(lively, p, 10) for p in cases]
        assert all(o["reason"] == "length" for o in outs)
        # sampling continues from the transferred generator state: same tokens as one engine
        assert [o["tokens"] for o in llm.generate(cases[:3], sampled)] == expected_sampled
        one_token = llm.generate(cases[:2], SamplingParams(max_tokens=1, ignore_eos=True))
        assert [o["tokens"] for o in one_token] == [hf_greedy(lively, p, 1) for p in cases[:2]]
    finally:
        llm.close()


def test_bad_split_settings_fail_before_spawning():
    with pytest.raises(ValueError, match="at least one"):
        DisaggregatedLLM("tiny", n_prefill=0, n_decode=1)
    with pytest.raises(ValueError, match="block_size"):
        DisaggregatedLLM("tiny", block_size=0)


def test_features_travel_with_the_kv(lively, weights, tmp_path):
    import torch

    from probes.probe import Probe
    from sae.io import save_sae
    from sae.sae import SAE, SAEConfig
    from tests.serve_hooks.test_hook import HOOK, offline

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=lively.d_model, n_latents=96, k=6, hook=HOOK, model="tiny"))
    sae_dir = save_sae(sae, tmp_path / HOOK)
    probe = Probe(
        "linear", HOOK, lively.d_model, "mean", torch.randn(lively.d_model), 0.1, name="dense"
    )
    probe.save(tmp_path / "dense")
    cases = prompts(3, seed=15)
    llm = DisaggregatedLLM(
        "tiny",
        n_prefill=1,
        n_decode=1,
        weights=weights,
        saes=[str(sae_dir)],
        probes=[str(tmp_path / "dense")],
        top_n=6,
        **SETTINGS,
    )
    try:
        outs = llm.generate(cases, SamplingParams(max_tokens=5, ignore_eos=True))
    finally:
        llm.close()
    for case, out in zip(cases, outs, strict=True):
        dense, scores = offline(lively, sae, [probe], case + out["tokens"][:-1])
        codes = out["features"]["codes"][HOOK]
        ours = torch.zeros_like(dense).scatter_(
            1, torch.tensor(codes["indices"]), torch.tensor(codes["values"])
        )
        assert torch.allclose(ours, dense, atol=1e-4), (
            "prompt features came from the prefill worker"
        )
        assert torch.allclose(
            torch.tensor(out["features"]["probes"]["dense"]), scores["dense"], atol=1e-4
        )
