"""The engine thread behind the server: concurrent requests batch correctly, an engine failure
fails only the requests in flight, shutdown answers 503, and streamed text never splits a
character or leaks a stop string."""

from __future__ import annotations

import threading

import httpx
from fastapi.testclient import TestClient

from serve_hooks.async_engine import AsyncEngine, Detokenizer
from serve_hooks.engine import RequestOutput
from serve_hooks.sequence import SamplingParams
from serve_hooks.server import build_app
from tests.serve_hooks.conftest import (
    events,
    metrics,
    new_engine,
    prompts,
    reference,
    slowed,
    wait_until,
)


def test_detokenizer_holds_back_partial_characters_and_stop_prefixes(lively):
    tokenizer = lively.tokenizer

    def feed(detok: Detokenizer, ids: list[int], final: str) -> list[str]:
        outs = [
            RequestOutput(0, [], ids[: i + 1], [t], i == len(ids) - 1, None)
            for i, t in enumerate(ids)
        ]
        outs[-1].text = final
        return [detok.delta(o) for o in outs]

    byte_ids = list(tokenizer("é", add_special_tokens=False)["input_ids"])
    assert len(byte_ids) == 2, "é is two byte tokens in the tiny tokenizer"
    assert feed(Detokenizer(tokenizer, []), byte_ids + byte_ids, "éé") == ["", "é", "", "é"]
    words = tokenizer(" to be or not", add_special_tokens=False)["input_ids"]
    deltas = feed(Detokenizer(tokenizer, [" or n"]), words, " to be")
    assert "".join(deltas) == " to be" and all("or" not in d for d in deltas)


# ------------------------------------------------------------------ concurrency and failures


def in_threads(fn, n: int, seconds: float) -> list:
    """fn(0..n-1) in n threads started together; the results in order, or a failure on a hang."""
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds)
    assert not any(t.is_alive() for t in threads), f"requests still unanswered after {seconds} s"
    return results


def test_concurrent_requests_are_batched_and_correct(client, lively):
    cases = prompts(8, seed=21, shared=9)
    greedy = SamplingParams(max_tokens=20, ignore_eos=True)
    sampled = SamplingParams(max_tokens=20, ignore_eos=True, temperature=0.8, top_k=50, seed=3)
    # A seed makes sampling reproducible.
    params = [sampled if i % 4 == 3 else greedy for i in range(len(cases))]
    expected = [o.text for o in reference(lively, cases, params)]
    before = metrics(client)

    def ask(i: int) -> str:
        p = params[i]
        body = {
            "prompt": cases[i],
            "max_tokens": 20,
            "ignore_eos": True,
            "temperature": p.temperature,
            "top_k": p.top_k,
            "seed": p.seed,
            "stream": i % 2 == 1,
        }
        response = client.post("/v1/completions", json=body)
        if body["stream"]:
            return "".join(c["choices"][0]["text"] for c in events(response))
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    assert in_threads(ask, len(cases), 60) == expected
    after = metrics(client)
    tokens = after["greylens_generation_tokens_total"] - before["greylens_generation_tokens_total"]
    steps = after["greylens_engine_steps_total"] - before["greylens_engine_steps_total"]
    assert tokens == 20 * len(cases)
    assert steps < tokens / 2, "requests that arrive together share engine steps"


def test_an_engine_failure_fails_the_requests_in_flight_and_serving_goes_on(served, monkeypatch):
    client, engine = served
    real_step, failed = engine.engine.step, []

    def step_failing_once() -> list[RequestOutput]:
        if not failed:
            failed.append(True)
            raise RuntimeError("simulated engine bug")
        return real_step()

    monkeypatch.setattr(engine.engine, "step", step_failing_once)
    broken = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3})
    assert broken.status_code == 500 and broken.json()["error"]["type"] == "server_error"
    assert (
        client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3}).status_code == 200
    )
    assert metrics(client)["greylens_kv_blocks_free"] == 96


def test_shutdown_answers_503_also_to_requests_in_flight(lively, monkeypatch):
    engine = AsyncEngine(slowed(new_engine(lively), monkeypatch))
    with TestClient(build_app(engine)) as client:
        assert (
            client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code
            == 200
        )
        long = {"prompt": "hi", "max_tokens": 200, "ignore_eos": True}
        answers: list[httpx.Response] = []
        thread = threading.Thread(
            target=lambda: answers.append(client.post("/v1/completions", json=long))
        )
        thread.start()
        wait_until(lambda: engine.snapshot.get("requests_running") == 1)
        engine.shutdown()
        thread.join(10)
        assert answers and answers[0].status_code == 503, answers and answers[0].text
        assert client.get("/health").status_code == 503
        refused = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
