"""Engine fixtures: HF reference outputs on `lively` (tests/conftest.py: a tiny Llama whose greedy
outputs vary; the default tiny model just repeats its last token, which would make every equality
test trivially true), and an engine served over HTTP (TestClient) with helpers to read its
answers."""

from __future__ import annotations

import copy
import json
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from sae.models import LoadedModel
from serve_hooks.async_engine import AsyncEngine
from serve_hooks.config import EngineConfig
from serve_hooks.engine import LLMEngine, RequestOutput
from serve_hooks.sequence import SamplingParams
from serve_hooks.server import build_app


def hf_greedy(model: LoadedModel, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy `generate`, exactly n tokens (EOS does not stop it: ignore_eos)."""
    config = copy.deepcopy(model.fast.generation_config)
    never = model.fast.config.vocab_size  # an id no step can produce (None would fall back to EOS)
    config.eos_token_id = config.pad_token_id = never
    out = model.fast.generate(
        torch.tensor([prompt]), generation_config=config, max_new_tokens=n, do_sample=False
    )
    assert out.shape[1] == len(prompt) + n, "the reference stopped early"
    return out[0, len(prompt) :].tolist()


def prompts(n: int, seed: int = 0, shared: int = 0, vocab: int = 500) -> list[list[int]]:
    """n random prompts of 3-40 tokens; the first `shared` tokens are common to all."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(3, vocab, (shared,), generator=g).tolist()
    return [
        head
        + torch.randint(
            3, vocab, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g
        ).tolist()
        for _ in range(n)
    ]


# --------------------------------------------------------------------------- a served engine

SETTINGS = dict(model="tiny", num_blocks=96, block_size=4, max_num_batched_tokens=64)
CONTEXT = 256  # the tiny model's context length


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
