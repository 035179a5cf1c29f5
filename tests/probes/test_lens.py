"""Lens on the tiny model: offline scores equal a hand-run forward, monitor equals plain
generation (greedy, steered, and seeded sampling) on `lively`, whose greedy tokens vary."""

from __future__ import annotations

import json

import pytest
import torch

from probes.activations import Features, Ragged, pool, tokenize
from probes.lens import Lens
from probes.probe import Probe
from probes.train import calibrate_probe, fit_probe
from sae.hooks import capture
from sae.io import load_sae
from tests.probes.conftest import HOOK, marker_texts


@pytest.fixture(scope="module")
def probes(marker_task, tiny_sae_dir, tmp_path_factory):
    texts, y, features = marker_task
    out = {}
    for kind, aggregation in (("linear", "mean"), ("mean_diff", "max"), ("sparse", "last")):
        probe = fit_probe(
            kind,
            features,
            y,
            hook=HOOK,
            aggregation=aggregation,
            k=5,
            sae=str(tiny_sae_dir),
            name=kind,
        )
        calibrate_probe(probe, features, y, fpr=0.1)
        out[kind] = probe
    return out


def manual_token_acts(tiny, text: str) -> torch.Tensor:
    ids = tokenize(tiny.tokenizer, [text], 256)[0]
    return capture(tiny, ids[None], [HOOK])[HOOK][0, 1:]  # [T, d], BOS dropped


def test_score_equals_manual_forward(tiny, probes, tiny_sae_dir):
    lens = Lens(tiny, probes=list(probes.values()), saes=[tiny_sae_dir], top_features=1000)
    texts, _ = marker_texts(6, seed=9)
    results = lens.score(texts)
    sae = load_sae(tiny_sae_dir)
    for text, result in zip(texts, results, strict=True):
        x = manual_token_acts(tiny, text)
        assert len(result.tokens) == x.shape[0]
        for name, probe in probes.items():
            code = sae.encode(x) if probe.needs_code else None
            expected = probe.token_scores(x, code)
            got = result.probes[name]
            assert torch.allclose(torch.tensor(got.token_scores), expected, atol=1e-5)
            pooled = float(
                pool(Ragged(expected[:, None], torch.tensor([0, x.shape[0]])), probe.aggregation)
            )
            assert got.score == pytest.approx(pooled, abs=1e-5)
            assert got.fired == (pooled > probe.threshold)
            assert got.probability == pytest.approx(
                float(torch.sigmoid(torch.tensor(pooled))), abs=1e-6
            )
        # sparse: contributions are w_i z_i at the last token and add up to S - b
        sparse = result.probes["sparse"]
        assert sum(f["contribution"] for f in sparse.top_features) == pytest.approx(
            sparse.score - probes["sparse"].bias, abs=1e-4
        )
        # linear (mean pooling) through the SAE: Σ_i z_i (w · d_i) == w · mean_t(x̂_t - b_dec)
        linear, probe = result.probes["linear"], probes["linear"]
        code = sae.encode(x)
        no_bias = (sae.decode(code) - sae.b_dec / sae.cfg.input_scale).mean(0)
        assert sum(f["contribution"] for f in linear.top_features) == pytest.approx(
            float(no_bias.detach() @ probe.weight), rel=1e-3, abs=1e-4
        )


def test_score_json_and_saved_probes(tiny, probes, tmp_path):
    for name, probe in probes.items():
        probe.save(tmp_path / name)
    text = "the king and the zebra"
    [loaded] = Lens(tiny, probes=[tmp_path / n for n in probes]).score(text)
    [in_memory] = Lens(tiny, probes=list(probes.values())).score(text)
    as_json = json.loads(json.dumps(loaded.to_json()))  # JSON-safe
    assert as_json["tokens"] == in_memory.tokens and set(as_json["probes"]) == set(probes)
    for name, result in in_memory.probes.items():  # the saved probe scores like the one in memory
        assert as_json["probes"][name]["token_scores"] == pytest.approx(
            result.token_scores, rel=1e-5, abs=1e-5
        )
        assert as_json["probes"][name]["fired"] == result.fired


def test_bad_input_fails_early(tiny, probes, tmp_path):
    wrong_hook = Probe(**{**probes["linear"].__dict__, "hook": "blocks.9.hook_resid_post"})
    with pytest.raises(ValueError, match="unknown hook point"):
        Lens(tiny, probes=[wrong_hook])
    wrong_width = Probe(**{**probes["linear"].__dict__, "d_model": 32, "weight": torch.zeros(32)})
    with pytest.raises(ValueError, match="d_model"):
        Lens(tiny, probes=[wrong_width])
    missing_sae = Probe(**{**probes["sparse"].__dict__, "sae": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Lens(tiny, probes=[missing_sae])
    lens = Lens(tiny, probes=[probes["linear"]])
    with pytest.raises(ValueError, match="empty"):
        lens.score(["fine", "  "])
    with pytest.raises(ValueError, match="unknown trigger"):
        lens.monitor("the", trigger="nope")
    with pytest.raises(ValueError, match="steering vector"):
        lens.monitor("the", trigger="linear", action="steer")


PROMPT = "the king of the land was"


def greedy_reference(
    model,
    n: int,
    add: torch.Tensor | None = None,
    layer: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[int]:
    """Greedy tokens from full forwards (no cache); `add` joins resid_post of `layer` after the
    prompt. With a temperature, tokens are drawn from softmax(logits / temperature) with a
    generator seeded by `seed`, the sampling rule `Lens.monitor` documents."""
    ids = tokenize(model.tokenizer, [PROMPT], 256)[0].tolist()
    generator = torch.Generator().manual_seed(seed)
    prompt_len = len(ids)

    def hook(module, args, output):
        if add is None:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, prompt_len:] += add
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = model.fast.model.layers[layer].register_forward_hook(hook)
    try:
        for _ in range(n):
            logits = model.fast(torch.tensor([ids])).logits[0, -1]
            if temperature == 0:
                ids.append(int(logits.argmax()))
            else:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                ids.append(int(torch.multinomial(probs, 1, generator=generator)))
    finally:
        handle.remove()
    return ids[prompt_len:]


def test_monitor_without_trigger_is_plain_greedy_generation(lively, probes):
    lens = Lens(lively, probes=[probes["linear"], probes["sparse"]])
    result = lens.monitor(PROMPT, max_new_tokens=8)
    reference = greedy_reference(lively, 8)
    # lively's greedy tokens vary (tiny's repeat one token), so a wrong generator fails here
    assert len(set(reference)) >= 4 and reference[0] != reference[1], reference
    assert result.token_ids == reference
    prompt_ids = tokenize(lively.tokenizer, [PROMPT], 256)[0][1:].tolist()  # BOS dropped
    n_prompt = len(prompt_ids)
    assert len(result.scores["linear"]) == n_prompt + 8  # every prompt and generated token scored
    # the score of each token equals an offline score of the same token ids (not of the decoded
    # text: BPE may re-tokenize varied generated text differently)
    offline = lens.score([prompt_ids + result.token_ids[:3]])[0]
    assert offline.probes["linear"].token_scores[: n_prompt + 3] == pytest.approx(
        result.scores["linear"][: n_prompt + 3], rel=1e-5, abs=1e-4
    )  # lively's scores reach hundreds: the KV-cached forward differs from a full one by ~1e-6


def test_monitor_samples_with_its_seed(lively, probes):
    lens = Lens(lively, probes=[probes["linear"]])
    sampled = lens.monitor(PROMPT, max_new_tokens=8, temperature=1.5, seed=3)
    assert sampled.token_ids == greedy_reference(lively, 8, temperature=1.5, seed=3)
    assert sampled.token_ids == lens.monitor(PROMPT, 8, temperature=1.5, seed=3).token_ids
    assert sampled.token_ids != greedy_reference(lively, 8), "temperature 1.5 should sample"


def test_monitor_stops_where_the_running_score_first_crosses(lively, probes):
    probe = Probe(**probes["linear"].__dict__)
    free = Lens(lively, probes=[probe]).monitor(PROMPT, max_new_tokens=8)
    running = free.running["linear"]
    n_prompt = (
        len(running) - 8
    )  # non-BOS prompt tokens; the trigger is checked from index n_prompt - 1 on
    checks = list(range(n_prompt - 1, len(running)))
    probe.threshold = sorted(running[i] for i in checks)[len(checks) // 2]  # the median check
    first = next(i for i in checks if running[i] > probe.threshold)
    stopped = Lens(lively, probes=[probe]).monitor(
        PROMPT, max_new_tokens=8, trigger="linear", action="stop"
    )
    assert stopped.triggered["token"] == first
    assert stopped.token_ids == free.token_ids[: first - (n_prompt - 1)]
    assert stopped.running["linear"] == pytest.approx(running[: first + 1], abs=1e-5)


def test_monitor_steering_matches_a_hooked_reference(lively, probes):
    probe = Probe(**probes["mean_diff"].__dict__)
    probe.threshold = -1e9  # fires on the prompt: steer every generated token
    vector = probe.direction / probe.direction.norm() * 40
    lens = Lens(lively, probes=[probe])
    steered = lens.monitor(
        PROMPT, max_new_tokens=6, trigger="mean_diff", action="steer", steering=vector
    )
    assert (
        steered.triggered["token"] == len(tokenize(lively.tokenizer, [PROMPT], 256)[0]) - 2
    )  # last prompt token
    assert steered.token_ids == greedy_reference(lively, 6, add=vector)
    assert steered.token_ids != greedy_reference(lively, 6), (
        "a vector of norm 40 should change the continuation"
    )
    zero = lens.monitor(
        PROMPT,
        max_new_tokens=6,
        trigger="mean_diff",
        action="steer",
        steering=torch.zeros_like(vector),
    )
    assert zero.token_ids == greedy_reference(lively, 6)


def test_features_type_is_what_probes_consume(marker_task, probes):
    _, y, features = marker_task
    assert isinstance(features, Features)
    assert probes["sparse"].text_scores(features).shape == y.shape
