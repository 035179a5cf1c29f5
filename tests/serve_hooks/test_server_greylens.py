"""The HTTP `greylens` field: per-token features and probe scores equal Lens, streamed chunks add
up to the whole answer, requests without the field encode nothing, paths come with a graph, and
what a server cannot answer is refused with the flag that would fix it."""

from __future__ import annotations

import argparse

import pytest
import torch
from fastapi.testclient import TestClient

from sae.cli import add_dataclass_args, dataclass_from_args
from serve_hooks.async_engine import AsyncEngine
from serve_hooks.hook import FeatureHook
from serve_hooks.server import ServerConfig, build_app
from tests.graphs.conftest import tiny_graph  # noqa: F401  (a session fixture: trained graph)
from tests.serve_hooks.conftest import events, new_engine, prompts
from tests.serve_hooks.test_hook_offline import HOOK, kit  # noqa: F401  (SAE dir, probes, Lens)


@pytest.fixture(scope="module")
def served(lively, kit):  # noqa: F811
    directory, probes, lens = kit
    engine = AsyncEngine(
        new_engine(lively),
        hook=lambda e: FeatureHook(e, [directory], probes, top_n=6, watch_all=False),
    )
    with TestClient(build_app(engine)) as client:
        yield client, engine, lens
    engine.shutdown()


def request(lively, seed: int, **greylens) -> dict:
    [case] = prompts(1, seed=seed)
    return {
        "prompt": [lively.tokenizer.bos_token_id, *case],
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
        "greylens": greylens,
    }


def test_answer_carries_features_and_scores_equal_to_lens(served, lively):
    client, _, lens = served
    body = client.post("/v1/completions", json=request(lively, 40, features=4)).json()
    prompt, grey = body_ids(body, lively), body["greylens"]
    assert (
        len(grey["prompt"]) == len(prompt)
        and len(grey["completion"]) == body["usage"]["completion_tokens"] == 5
    )
    tokens = grey["prompt"] + grey["completion"]
    assert [t["id"] for t in grey["prompt"]] == prompt
    assert grey["completion"][-1]["features"] is None, "the last token was never read"
    # Lens adds BOS; the engine read BOS .. last-but-one.
    [ref] = lens.score([[t["id"] for t in tokens[1:-1]]])
    for t, item in enumerate(tokens[1:-1]):
        ids, values = ref.features[HOOK]["indices"][t][:4], ref.features[HOOK]["values"][t][:4]
        got = item["features"][HOOK]
        assert [i for i, _ in got] == ids and torch.allclose(
            torch.tensor([v for _, v in got]), torch.tensor(values), atol=1e-4
        )
        for name, result in ref.probes.items():
            assert abs(item["probes"][name] - result.token_scores[t]) < 1e-4
    for name, result in ref.probes.items():
        summary = grey["probes"][name]
        assert abs(summary["score"] - result.score) < 1e-4 and summary["fired"] == result.fired


def body_ids(body: dict, lively) -> list[int]:
    return [t["id"] for t in body["greylens"]["prompt"]]


def test_stream_chunks_add_up_to_the_answer(served, lively):
    client, _, _ = served
    asked = request(lively, 41, features=3, probes=["dense"])
    whole = client.post("/v1/completions", json=asked).json()["greylens"]
    chunks = [
        c["greylens"]
        for c in events(client.post("/v1/completions", json={**asked, "stream": True}))
    ]
    assert len(chunks) > 2, "results arrive per step, not at the end"
    joined = {part: [t for c in chunks for t in c[part]] for part in ("prompt", "completion")}
    for part, items in joined.items():
        assert [t["id"] for t in items] == [t["id"] for t in whole[part]]
        for a, b in zip(items, whole[part], strict=True):
            assert (a["features"] is None) == (b["features"] is None)
            if a["features"] is not None:
                assert [i for i, _ in a["features"][HOOK]] == [i for i, _ in b["features"][HOOK]]
                assert (
                    set(a["probes"]) == {"dense"}
                    and abs(a["probes"]["dense"] - b["probes"]["dense"]) < 1e-4
                )
    assert [c for c in chunks if "probes" in c] == [chunks[-1]] and set(chunks[-1]["probes"]) == {
        "dense"
    }


def test_requests_without_the_field_encode_nothing(served, lively):
    client, engine, _ = served
    encoder = engine.hook.saes[HOOK]
    calls = []
    real = encoder.encode
    encoder.encode = lambda x: calls.append(len(x)) or real(x)
    try:
        plain = request(lively, 42)
        del plain["greylens"]
        body = client.post("/v1/completions", json=plain).json()
        assert "greylens" not in body and calls == []
        client.post("/v1/completions", json=request(lively, 42))
        assert calls, "the same prompt with the field does encode"
    finally:
        encoder.encode = real
    assert engine.hook.requests == {} and engine.hook.watched == set(), (
        "finished requests leave no state"
    )


@pytest.mark.parametrize(
    ("greylens", "message"),
    [
        ({"features": 7}, "--top-n 6"),
        ({"probes": ["nope"]}, "unknown probes"),
        ({"paths": True}, "--graph"),
        ({"features": -1}, "greater than"),
    ],
)
def test_what_the_server_cannot_answer_is_refused(served, lively, greylens, message):
    client, _, _ = served
    response = client.post("/v1/completions", json=request(lively, 43, **greylens))
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_paths_for_generated_tokens_with_a_graph(tiny, tiny_graph):  # noqa: F811
    engine = AsyncEngine(
        new_engine(tiny),
        hook=ServerConfig(
            graph=str(tiny_graph.graph), transition=str(tiny_graph.transition)
        ).feature_hook,
    )
    with TestClient(build_app(engine)) as client:
        body = client.post("/v1/completions", json=request(tiny, 44, features=2, paths=True)).json()
        plain = AsyncEngine(new_engine(tiny))
        with TestClient(build_app(plain)) as bare:
            refused = bare.post("/v1/completions", json=request(tiny, 44))
        plain.shutdown()
    engine.shutdown()
    paths = body["greylens"]["paths"]
    n_prompt = len(body["greylens"]["prompt"])
    assert [p["position"] for p in paths] == list(range(n_prompt - 1, n_prompt + 4))
    assert [p["token_id"] for p in paths] == [t["id"] for t in body["greylens"]["completion"]]
    assert any(p["paths"] or p["direct"] for p in paths)
    assert refused.status_code == 400 and "--sae" in refused.json()["error"]["message"]


def test_command_line_takes_repeatable_hook_flags():
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, ServerConfig)
    cfg = dataclass_from_args(
        ServerConfig,
        parser.parse_args(["--sae", "a", "--sae", "b", "--probe", "p", "q", "--top-n", "4"]),
    )
    assert cfg.sae == ["a", "b"] and cfg.probe == ["p", "q"] and cfg.top_n == 4 and cfg.graph == ""
    assert dataclass_from_args(ServerConfig, parser.parse_args([])).sae == []
    with pytest.raises(ValueError, match="--graph"):
        ServerConfig(transition="t").feature_hook(None)
