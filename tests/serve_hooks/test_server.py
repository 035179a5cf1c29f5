"""The OpenAI-compatible server: answers equal the engine's own, streams equal non-streamed
answers, hundreds of malformed requests all get a 4xx and the server keeps serving, concurrent
requests batch correctly, and the real command line serves over a socket."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from serve_hooks.__main__ import main
from serve_hooks.async_engine import AsyncEngine, Detokenizer
from serve_hooks.config import EngineConfig
from serve_hooks.engine import LLMEngine, RequestOutput
from serve_hooks.sequence import SamplingParams
from serve_hooks.server import ServerConfig, build_app
from tests.serve_hooks.conftest import prompts

SETTINGS = dict(model="tiny", num_blocks=96, block_size=4, max_num_batched_tokens=64)
CONTEXT = 256  # the tiny model's context length
REPO = Path(__file__).resolve().parents[2]


def new_engine(model, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(**{**SETTINGS, **overrides}), model)


def reference(model, prompt_list: list, params: SamplingParams) -> list[RequestOutput]:
    """What the engine itself generates, on a fresh engine of the same settings."""
    return new_engine(model).generate(prompt_list, params)


@pytest.fixture(scope="module")
def served(lively):
    engine = AsyncEngine(new_engine(lively))
    with TestClient(build_app(engine)) as client:
        yield client, engine
    engine.shutdown()


@pytest.fixture
def client(served) -> TestClient:
    return served[0]


def events(response: httpx.Response) -> list[dict]:
    """The JSON payloads of a Server-Sent Events body, checking the framing and the final [DONE]."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    raw = response.text.split("\n\n")
    assert raw[-1] == "", "every event ends with a blank line"
    assert all(e.startswith("data: ") for e in raw[:-1])
    payloads = [e[len("data: ") :] for e in raw[:-1]]
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


def metrics(client: TestClient) -> dict[str, float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    rows = [
        line.split() for line in response.text.splitlines() if line and not line.startswith("#")
    ]
    return {name: float(value) for name, value in rows}


# --------------------------------------------------------------------------- answers


def test_completion_equals_engine_generate(client, lively):
    cases = prompts(3, seed=5)
    params = SamplingParams(max_tokens=12)
    expected = reference(lively, cases, params)
    for prompt, ref in zip(cases, expected, strict=True):
        body = client.post(
            "/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0}
        ).json()
        assert (
            body["object"] == "text_completion"
            and body["model"] == "tiny"
            and body["id"].startswith("cmpl-")
        )
        assert isinstance(body["created"], int)
        assert body["choices"] == [
            {"index": 0, "text": ref.text, "finish_reason": ref.finish_reason, "logprobs": None}
        ]
        n = len(ref.token_ids)
        assert body["usage"] == {
            "prompt_tokens": len(prompt),
            "completion_tokens": n,
            "total_tokens": len(prompt) + n,
        }
    # a text prompt is tokenized the engine's way (BOS first)
    text = "To be, or not to be"
    ref = reference(lively, [text], params)[0]
    body = client.post(
        "/v1/completions", json={"prompt": text, "max_tokens": 12, "temperature": 0.0}
    ).json()
    assert body["choices"][0]["text"] == ref.text
    assert body["usage"]["prompt_tokens"] == len(ref.prompt_token_ids)


def test_streamed_completion_equals_the_answer_and_respects_stop(client, lively):
    prompt = prompts(1, seed=7)[0]
    free = reference(lively, [prompt], SamplingParams(max_tokens=16, ignore_eos=True))[0].text
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    assert stop.strip() and free.find(stop) > 0, f"pick another prompt: {free!r}"
    request = {
        "prompt": prompt,
        "max_tokens": 16,
        "temperature": 0,
        "ignore_eos": True,
        "stop": [stop],
    }
    whole = client.post("/v1/completions", json=request).json()["choices"][0]
    assert whole["text"] == free[: free.find(stop)] and whole["finish_reason"] == "stop"
    chunks = events(client.post("/v1/completions", json={**request, "stream": True}))
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert not any(stop in c["choices"][0]["text"] for c in chunks), (
        "text past a stop string was sent"
    )
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [
        "stop"
    ]
    assert len(chunks) > 2, "one chunk per token, not one at the end"


def test_chat_completion_and_stream(client, lively):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Friends, Romans"},
    ]
    fallback = (
        "system: Be brief.\nuser: Friends, Romans\nassistant:"  # the tiny tokenizer has no template
    )
    ref = reference(lively, [fallback], SamplingParams(max_tokens=10))[0]
    request = {"messages": messages, "max_tokens": 10, "temperature": 0}
    body = client.post("/v1/chat/completions", json=request).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ref.text}
    assert body["choices"][0]["finish_reason"] == ref.finish_reason
    assert body["usage"]["prompt_tokens"] == len(ref.prompt_token_ids)
    assert body["usage"]["completion_tokens"] == len(ref.token_ids)

    stream = {**request, "stream": True, "stream_options": {"include_usage": True}}
    chunks = events(client.post("/v1/chat/completions", json=stream))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    assert "".join(d.get("content", "") for d in deltas) == ref.text
    assert chunks[-2]["choices"][0]["finish_reason"] == ref.finish_reason
    # content given as text parts is the same conversation
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    same = client.post("/v1/chat/completions", json={**request, "messages": parts}).json()
    assert same["choices"][0]["message"]["content"] == ref.text


def test_chat_without_max_tokens_fills_the_context(client):
    request = {
        "messages": [{"role": "user", "content": "Once"}],
        "temperature": 0,
        "ignore_eos": True,
    }
    body = client.post("/v1/chat/completions", json=request).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == CONTEXT


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


# --------------------------------------------------------------------------- operations


def test_health_models_and_metrics_move(client):
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["max_model_len"] == CONTEXT
    before = metrics(client)
    for name in (
        "requests_received",
        "requests_succeeded",
        "requests_failed",
        "requests_aborted",
        "prompt_tokens",
        "generation_tokens",
        "engine_steps",
        "prefix_cache_hit_tokens",
    ):
        assert f"greylens_{name}_total" in before
    for name in ("requests_running", "requests_waiting", "kv_blocks_total", "kv_blocks_free"):
        assert f"greylens_{name}" in before
    prompt = prompts(1, seed=11, shared=20)[0]
    for _ in range(2):  # the second run finds the prompt's full blocks in the prefix cache
        assert (
            client.post(
                "/v1/completions", json={"prompt": prompt, "max_tokens": 5, "ignore_eos": True}
            ).status_code
            == 200
        )
    assert client.post("/v1/completions", json={"prompt": ""}).status_code == 400
    after = metrics(client)
    moved = {k: after[k] - before[k] for k in after}
    assert moved["greylens_requests_received_total"] == 3
    assert moved["greylens_requests_succeeded_total"] == 2
    assert moved["greylens_requests_failed_total"] == 1
    assert moved["greylens_prompt_tokens_total"] == 2 * len(prompt)
    assert moved["greylens_generation_tokens_total"] == 10
    assert moved["greylens_engine_steps_total"] >= 8
    assert moved["greylens_prefix_cache_hit_tokens_total"] >= 20
    assert after["greylens_kv_blocks_total"] == 96 and after["greylens_kv_blocks_free"] == 96
    assert after["greylens_requests_running"] == 0 and after["greylens_requests_waiting"] == 0


# --------------------------------------------------------------------------- malformed requests

COMPLETION = {"prompt": "hello", "max_tokens": 4}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
# values each field must refuse, on both endpoints
BAD_FIELDS: dict[str, list] = {
    "temperature": [-0.1, 100.5, "0.5", True, [], {}, None, 1e300 * 10],
    "top_p": [0, -1, 1.0001, 2, "1", None, False],
    "top_k": [-1, 1.5, "5", 2**40, True, None],
    "seed": [-1, 2**63, 2**64, 1.5, "1", True],
    "max_tokens": [0, -5, -(2**70), 10**9, CONTEXT + 1, 1.5, "4", True, [4]],
    "stop": ["", [""], [1, 2], 5, {"a": 1}, ["x"] * 17, [None]],
    "stream": ["yes", 1, None, []],
    "n": [2, 0, -1, "1", 1.5, True],
    "ignore_eos": ["true", 1, None],
    "stop_token_ids": [["a"], 5, [1.5], None],
    "model": ["gpt-4", 5, [], ""],
    "user": [5, [], {}],
    "stream_options": [{"include_usage": "yes"}, {"other": 1}, "x", 1],
}
UNKNOWN_FIELDS = [
    "frobnicate",
    "logit_bias",
    "best_of",
    "echo",
    "Prompt",
    "max_token",
    "suffix",
    "functions",
]
BAD_PROMPTS = [
    "",
    [],
    [-1],
    [537],
    [10**30],
    ["a", "b"],
    [1.5],
    [True],
    None,
    5,
    {"text": "x"},
    [[1, 2]],
    list(range(3, 3 + CONTEXT + 40)),
    "word " * 400,
]
BAD_MESSAGES = [
    [],
    None,
    "hi",
    [{"role": "robot", "content": "x"}],
    [{"role": "user"}],
    [{"content": "x"}],
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": "x", "extra": 1}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
    [{"role": "user", "content": [{"type": "text"}]}],
    [{"role": "user", "content": None}],
    [{"role": "user", "content": "word " * 400}],
    [["user", "hi"]],
    [{"role": 1, "content": "x"}],
]
CONTENT_TYPES = [
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "",
    "application/xml",
    "json",
]
JSON = {"content-type": "application/json"}


def malformed_requests(rng: random.Random) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(method, path, body, headers) of requests a server must refuse with a 4xx."""
    cases: list[tuple[str, str, bytes, dict[str, str]]] = []

    def post(path: str, body: object, headers: dict[str, str] = JSON) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        cases.append(("POST", path, data, headers))

    endpoints = [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]
    for path, valid in endpoints:
        for name, values in BAD_FIELDS.items():
            for value in values:
                post(
                    path,
                    {**valid, name: value, "stream": rng.random() < 0.3}
                    if name != "stream"
                    else {**valid, name: value},
                )
        for name in UNKNOWN_FIELDS:
            post(path, {**valid, name: 1})
        for kind in CONTENT_TYPES:
            post(path, valid, {"content-type": kind} if kind else {})
        for top in ([], 1, "x", None, True, [valid]):
            post(path, top)
        for text in (
            b"",
            b"{",
            b"[" * 5000,
            b'{"prompt": "\xff\xfe"}',
            b'{"prompt": "\\ud800"}',
            b"\xef\xbb\xbf{}",
            b"NaN",
        ):
            post(path, text)
        post(path, json.dumps({**valid, "temperature": 0.5}).replace("0.5", "NaN").encode())
        post(path, json.dumps({**valid, "top_p": 0.5}).replace("0.5", "Infinity").encode())
        for method in ("GET", "PUT", "DELETE"):
            cases.append((method, path, b"", {}))
    for prompt in BAD_PROMPTS:
        post("/v1/completions", {**COMPLETION, "prompt": prompt, "stream": rng.random() < 0.5})
    post("/v1/completions", {"max_tokens": 4})
    for messages in BAD_MESSAGES:
        post("/v1/chat/completions", {**CHAT, "messages": messages, "stream": rng.random() < 0.5})
    post("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0})
    post("/v1/chat/completions", COMPLETION)  # a completion body on the chat endpoint
    post("/v1/completions", CHAT)
    post("/v1/complete", COMPLETION)  # no such route
    # Random damage: garbage bytes, truncated bodies, several bad fields at once.
    while len(cases) < 400:
        path, valid = rng.choice(endpoints)
        roll = rng.random()
        if roll < 0.3:
            post(path, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
        elif roll < 0.6:
            data = json.dumps({**valid, "temperature": 0.5, "stop": ["\n"]}).encode()
            post(path, data[: rng.randrange(1, len(data) - 1)])
        else:
            bad = dict(valid)
            for name in rng.sample(sorted(BAD_FIELDS), rng.randrange(1, 4)):
                bad[name] = rng.choice(BAD_FIELDS[name])
            post(path, bad)
    return cases


def run_with_deadline(fn, seconds: float):
    """Run fn in a thread; fail (instead of hanging the suite) if it does not finish in time."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no answer within {seconds} s: the server hangs"
    assert result, "the worker thread failed (see the traceback above)"
    return result[0]


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(client):
    cases = malformed_requests(random.Random(1234))
    assert len(cases) >= 300
    before = metrics(client)

    def send_all() -> list[str]:
        problems = []
        for method, path, body, headers in cases:
            response = client.request(method, path, content=body, headers=headers)
            if not 400 <= response.status_code < 500:
                problems.append(
                    f"{response.status_code} for {method} {path} {body[:80]!r}: "
                    f"{response.text[:200]}"
                )
                continue
            error = response.json().get("error", {})
            if not (
                isinstance(error.get("message"), str) and error["message"] and error.get("type")
            ):
                problems.append(f"no error message for {body[:80]!r}: {response.text[:200]}")
        return problems

    problems = run_with_deadline(send_all, 120)
    assert not problems, f"{len(problems)} bad answers, e.g.\n" + "\n".join(problems[:8])
    ok = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    to_generate = sum(
        1 for _, path, _, _ in cases if path in ("/v1/completions", "/v1/chat/completions")
    )
    after = metrics(client)
    assert (
        after["greylens_requests_failed_total"] - before["greylens_requests_failed_total"]
        == to_generate
    )
    assert after["greylens_requests_running"] == 0 and after["greylens_kv_blocks_free"] == 96


def test_error_messages_say_what_is_wrong(client):
    def message(path: str, body: dict) -> str:
        response = client.post(path, json=body)
        assert (
            response.status_code == 400
            and response.json()["error"]["type"] == "invalid_request_error"
        )
        return response.json()["error"]["message"]

    assert "temperature" in message("/v1/completions", {**COMPLETION, "temperature": 101})
    assert "frobnicate" in message("/v1/completions", {**COMPLETION, "frobnicate": 1})
    assert "n=1" in message("/v1/completions", {**COMPLETION, "n": 2})
    assert "context limit" in message("/v1/completions", {**COMPLETION, "prompt": "word " * 400})
    assert "empty" in message("/v1/completions", {**COMPLETION, "prompt": ""})
    assert "messages" in message("/v1/chat/completions", {**CHAT, "messages": []})
    assert "stop" in message("/v1/completions", {**COMPLETION, "stop": ""})
    response = client.post(
        "/v1/completions", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"}
    )
    assert response.status_code == 415 and "application/json" in response.json()["error"]["message"]


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


def slowed(llm: LLMEngine, monkeypatch, seconds: float = 0.01) -> LLMEngine:
    """Make every engine step take a while, so a request is still running when the test acts."""
    real_step = llm.step
    monkeypatch.setattr(llm, "step", lambda: (time.sleep(seconds), real_step())[1])
    return llm


def wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


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


# --------------------------------------------------------------------------- real sockets


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def live_server(engine: AsyncEngine) -> Iterator[str]:
    """uvicorn in a thread on a free localhost port; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_client_disconnect_aborts_the_request(lively, monkeypatch):
    engine = AsyncEngine(slowed(new_engine(lively), monkeypatch))  # 200 tokens take > 2 s
    body = {"prompt": "hello", "max_tokens": 200, "ignore_eos": True}
    try:
        with live_server(engine) as base:
            with httpx.stream(
                "POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=10
            ) as response:
                assert response.status_code == 200
                next(line for line in response.iter_lines() if line.startswith("data: "))
            # hung up after the first chunk: the engine drops the request and frees its blocks
            wait_until(
                lambda: (
                    engine.counters["requests_aborted"] == 1
                    and engine.snapshot["requests_running"] == 0
                )
            )
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{base}/v1/completions", json=body, timeout=0.3)
            wait_until(
                lambda: (
                    engine.counters["requests_aborted"] == 2
                    and engine.snapshot["requests_running"] == 0
                )
            )
            assert engine.snapshot["kv_blocks_free"] == 96
            assert engine.engine.stats["decode_tokens"] < 100, (
                "the engine stopped computing the aborted requests"
            )
            ok = httpx.post(
                f"{base}/v1/completions", json={"prompt": "hello", "max_tokens": 2}, timeout=10
            )
            assert ok.status_code == 200
    finally:
        engine.shutdown()


def test_command_line_serves_over_a_socket(tmp_path):
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "serve_hooks",
        "serve",
        "--model",
        "tiny",
        "--port",
        str(port),
        "--num-blocks",
        "64",
        "--block-size",
        "4",
        "--log-level",
        "warning",
    ]
    log = tmp_path / "server.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=sink, stderr=sink
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no /health after 120 s:\n{log.read_text()}"
            try:
                if httpx.get(f"{base}/health", timeout=1).json() == {"status": "ok"}:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        answer = httpx.post(
            f"{base}/v1/completions",
            json={"prompt": "hello world", "max_tokens": 5, "temperature": 0},
            timeout=30,
        )
        assert answer.status_code == 200
        # The plain tiny model repeats its last token.
        assert answer.json()["choices"][0]["text"] == " world" * 5
        assert (
            httpx.post(f"{base}/v1/completions", json={"prompt": ""}, timeout=30).status_code == 400
        )
        streamed = httpx.post(
            f"{base}/v1/chat/completions",
            timeout=30,
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
        )
        assert len(events(streamed)) == 1 + 3  # the role chunk, then one chunk per token
    finally:
        process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 0, log.read_text()


def test_command_line_help_comes_from_the_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--model",
        "--host",
        "--port",
        "--num-blocks",
        "--max-model-len",
        "--enable-prefix-cache",
        "--disk-dir",
    ):
        assert flag in text
    assert "localhost by default" in text and ServerConfig().host == "127.0.0.1"
