"""The OpenAI-compatible server: answers equal the engine's own, streams equal non-streamed
answers, health, models and metrics move, and the real command line serves over a socket.
(Malformed requests: test_api; batching, failures and shutdown: test_async_engine.)"""

from __future__ import annotations

import os
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

from serve_hooks.__main__ import main
from serve_hooks.async_engine import AsyncEngine
from serve_hooks.sequence import SamplingParams
from serve_hooks.server import ServerConfig, build_app
from tests.serve_hooks.conftest import (
    CONTEXT,
    events,
    metrics,
    new_engine,
    prompts,
    reference,
    slowed,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]


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
