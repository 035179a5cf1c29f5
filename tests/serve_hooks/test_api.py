"""Request validation: hundreds of malformed requests all get a 4xx that says what is wrong,
and the server keeps serving."""

from __future__ import annotations

import json
import random
import threading

from tests.serve_hooks.conftest import CONTEXT, metrics

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


Case = tuple[str, str, bytes, dict[str, str]]  # (method, path, body, headers)
ENDPOINTS = [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]


def post(path: str, body: object, headers: dict[str, str] = JSON) -> Case:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return ("POST", path, data, headers)


def endpoint_cases(path: str, valid: dict, rng: random.Random) -> list[Case]:
    """Bad fields, unknown fields, content types, bodies and methods for one endpoint."""
    cases = []
    for name, values in BAD_FIELDS.items():
        for value in values:
            stream = {"stream": rng.random() < 0.3} if name != "stream" else {}
            cases.append(post(path, {**valid, name: value, **stream}))
    cases += [post(path, {**valid, name: 1}) for name in UNKNOWN_FIELDS]
    cases += [post(path, valid, {"content-type": kind} if kind else {}) for kind in CONTENT_TYPES]
    cases += [post(path, top) for top in ([], 1, "x", None, True, [valid])]
    for text in (
        b"",
        b"{",
        b"[" * 5000,
        b'{"prompt": "\xff\xfe"}',
        b'{"prompt": "\\ud800"}',
        b"\xef\xbb\xbf{}",
        b"NaN",
    ):
        cases.append(post(path, text))
    cases.append(
        post(path, json.dumps({**valid, "temperature": 0.5}).replace("0.5", "NaN").encode())
    )
    cases.append(
        post(path, json.dumps({**valid, "top_p": 0.5}).replace("0.5", "Infinity").encode())
    )
    cases += [(method, path, b"", {}) for method in ("GET", "PUT", "DELETE")]
    return cases


def random_damage(rng: random.Random) -> Case:
    """Garbage bytes, a truncated body, or several bad fields at once."""
    path, valid = rng.choice(ENDPOINTS)
    roll = rng.random()
    if roll < 0.3:
        return post(path, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
    if roll < 0.6:
        data = json.dumps({**valid, "temperature": 0.5, "stop": ["\n"]}).encode()
        return post(path, data[: rng.randrange(1, len(data) - 1)])
    bad = dict(valid)
    for name in rng.sample(sorted(BAD_FIELDS), rng.randrange(1, 4)):
        bad[name] = rng.choice(BAD_FIELDS[name])
    return post(path, bad)


def malformed_requests(rng: random.Random) -> list[Case]:
    """Requests a server must refuse with a 4xx: fixed cases, then random damage up to 400."""
    cases = [c for path, valid in ENDPOINTS for c in endpoint_cases(path, valid, rng)]
    for prompt in BAD_PROMPTS:
        cases.append(
            post("/v1/completions", {**COMPLETION, "prompt": prompt, "stream": rng.random() < 0.5})
        )
    cases.append(post("/v1/completions", {"max_tokens": 4}))
    for messages in BAD_MESSAGES:
        body = {**CHAT, "messages": messages, "stream": rng.random() < 0.5}
        cases.append(post("/v1/chat/completions", body))
    cases.append(post("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}))
    cases.append(post("/v1/chat/completions", COMPLETION))  # a completion body on the chat endpoint
    cases.append(post("/v1/completions", CHAT))
    cases.append(post("/v1/complete", COMPLETION))  # no such route
    while len(cases) < 400:
        cases.append(random_damage(rng))
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
