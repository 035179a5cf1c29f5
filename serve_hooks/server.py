"""An OpenAI-compatible HTTP server around `LLMEngine` (FastAPI + uvicorn).

    python -m serve_hooks serve --model smollm2-135m --port 8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "Once upon a time", "max_tokens": 32}'

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both stream Server-Sent Events
ending in `data: [DONE]` when `"stream": true`), `GET /v1/models`, `GET /health`, `GET /metrics`
(Prometheus text). Extensions to OpenAI's fields: `top_k`, `ignore_eos`, `stop_token_ids`, and
`greylens` (per-token SAE features, probe scores and reasoning paths of the prompt and the
completion, for a server started with --sae / --probe / --graph; see serve_hooks.report).
Requests without `greylens` run no SAE or probe at all.

The engine is not thread-safe, so `AsyncEngine` gives it exactly one thread: HTTP handlers put
requests and aborts on a queue; the thread admits them, steps the engine while there is work and
hands each output to its handler's asyncio queue with `call_soon_threadsafe`. Everything that
touches the engine or its tokenizer after start-up (tokenizing, decoding stream deltas) runs on
that thread. A bad request gets a 4xx `{"error": {"message", "type"}}` with the reason, and the
server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_hooks.api import (
    APIError,
    ChatRequest,
    CompletionRequest,
    _Sampling,
    error_response,
    parse_body,
    sampling_params,
)
from serve_hooks.async_engine import AsyncEngine, Chunk, Handle
from serve_hooks.config import EngineConfig
from serve_hooks.engine import LLMEngine, RequestOutput
from serve_hooks.hook import FeatureHook

GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class ServerConfig(EngineConfig):
    """Every engine setting (see EngineConfig) plus where and how the server listens."""

    host: str = "127.0.0.1"
    """Address to bind (localhost by default: the server has no authentication)."""
    port: int = 8000
    """TCP port to listen on."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """How much uvicorn logs."""
    sae: list[str] = field(default_factory=list)
    """SAE directories whose per-token features requests can ask for (one per hook; repeatable)."""
    probe: list[str] = field(default_factory=list)
    """Probe directories whose per-token and pooled scores requests can ask for (repeatable)."""
    graph: str = ""
    """A graph autoencoder directory: its features at its hook, and reasoning paths of generated
    tokens."""
    transition: str = ""
    """A cross-layer transition directory for the graph (paths go source -> target -> token)."""
    top_n: int = 8
    """Most latents per token per SAE a request may ask for (what the hook keeps)."""

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**{f.name: getattr(self, f.name) for f in fields(EngineConfig)})

    def feature_hook(self, engine: LLMEngine) -> FeatureHook | None:
        """The hook answering `greylens` requests, if any SAE, probe or graph is attached."""
        if not (self.sae or self.probe or self.graph):
            if self.transition:
                raise ValueError(
                    "--transition needs --graph (the graph autoencoder it starts from)"
                )
            return None
        return FeatureHook(
            engine,
            self.sae,
            self.probe,
            self.top_n,
            watch_all=False,
            graph=self.graph or None,
            transition=self.transition or None,
        )


# --------------------------------------------------------------------------- the HTTP app

METRICS = {  # name: (type, help); counters end in _total in the exposition
    "requests_received": ("counter", "Generation requests received (valid or not)."),
    "requests_succeeded": ("counter", "Generation requests that finished (stop or length)."),
    "requests_failed": ("counter", "Generation requests answered with an error."),
    "requests_aborted": ("counter", "Requests aborted because the client went away."),
    "prompt_tokens": ("counter", "Prompt tokens of accepted requests."),
    "generation_tokens": ("counter", "Tokens generated."),
    "engine_steps": ("counter", "Engine steps run."),
    "prefix_cache_hit_tokens": ("counter", "Prompt tokens served from the prefix cache."),
    "requests_running": ("gauge", "Requests in the running batch."),
    "requests_waiting": ("gauge", "Requests waiting for admission."),
    "kv_blocks_total": ("gauge", "KV blocks in the device pool."),
    "kv_blocks_free": ("gauge", "KV blocks free or evictable."),
}


def render_metrics(engine: AsyncEngine) -> str:
    values = engine.metric_values()
    lines = []
    for name, (kind, text) in METRICS.items():
        full = f"greylens_{name}_total" if kind == "counter" else f"greylens_{name}"
        lines += [f"# HELP {full} {text}", f"# TYPE {full} {kind}", f"{full} {values.get(name, 0)}"]
    return "\n".join(lines) + "\n"


@dataclass
class _Reply:
    """The OpenAI response shapes of one request."""

    id: str
    model: str
    chat: bool
    created: int

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def full(
        self, out: RequestOutput, usage: dict[str, int], greylens: dict | None = None
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": out.finish_reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": out.text}
        else:
            choice["text"] = out.text
        body = {
            **self._head("chat.completion" if self.chat else "text_completion"),
            "choices": [choice],
            "usage": usage,
        }
        if greylens is not None:
            body["greylens"] = greylens
        return body

    def chunk(
        self,
        text: str | None,
        finish: str | None,
        usage: dict[str, int] | None = None,
        greylens: dict | None = None,
    ) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:  # text None: the opening chunk that names the role
            choice["delta"] = (
                {"role": "assistant", "content": ""}
                if text is None
                else ({"content": text} if text else {})
            )
        else:
            choice["text"] = text or ""
        body = {
            **self._head("chat.completion.chunk" if self.chat else "text_completion"),
            "choices": [] if usage else [choice],
        }
        if usage:
            body["usage"] = usage
        if greylens is not None:
            body["greylens"] = greylens
        return f"data: {json.dumps(body)}\n\n"


def _usage(handle: Handle, out: RequestOutput) -> dict[str, int]:
    n = len(out.token_ids)
    return {
        "prompt_tokens": handle.prompt_tokens,
        "completion_tokens": n,
        "total_tokens": handle.prompt_tokens + n,
    }


async def _stream(
    engine: AsyncEngine, handle: Handle, reply: _Reply, include_usage: bool
) -> AsyncIterator[str]:
    try:
        if reply.chat:
            yield reply.chunk(None, None)
        async for chunk in engine.results(handle):
            out = chunk.output
            if chunk.delta or out.finished or chunk.greylens is not None:
                yield reply.chunk(
                    chunk.delta,
                    out.finish_reason if out.finished else None,
                    greylens=chunk.greylens,
                )
        engine.count("requests_succeeded")
        if include_usage:
            yield reply.chunk(None, None, _usage(handle, out))
    except APIError as error:  # the 200 status line is already out: report the failure in-band
        engine.count("requests_failed")
        yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.kind}})}\n\n"
    finally:
        engine.abort(handle)  # the client went away mid-stream (a no-op once the request finished)
    yield "data: [DONE]\n\n"


async def _client_gone(request: Request) -> None:
    # the body is read, so the next ASGI message is the disconnect (or arrives after our response)
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _final_output(request: Request, engine: AsyncEngine, handle: Handle) -> Chunk:
    """Wait for the finished output; abort the request if the client disconnects first."""

    async def last() -> Chunk:
        final = None
        # Keep only the latest: outputs carry all ids so far.
        async for chunk in engine.results(handle):
            final = chunk
        return final

    result, gone = asyncio.ensure_future(last()), asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():
            result.cancel()
            engine.abort(handle)
    if result.cancelled():
        raise APIError(499, "the client closed the request")
    return result.result()


async def _generate(
    request: Request,
    engine: AsyncEngine,
    body: _Sampling,
    prompt: str | list[int] | list[dict],
    max_tokens: int | None,
    chat: bool,
) -> Response:
    if body.model not in (None, engine.model_name):
        raise APIError(
            404,
            f"model {body.model!r} is not served here; this server serves {engine.model_name!r}",
            "not_found_error",
        )
    params = sampling_params(body, max_tokens, engine.engine.max_model_len)
    handle = await engine.submit(
        prompt,
        params,
        chat=chat,
        fill=max_tokens is None,
        stream=body.stream,
        greylens=body.greylens,
    )
    reply = _Reply(
        f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        engine.model_name,
        chat,
        int(time.time()),
    )
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _stream(engine, handle, reply, include_usage), media_type="text/event-stream"
        )
    last = await _final_output(request, engine, handle)
    engine.count("requests_succeeded")
    body = reply.full(last.output, _usage(handle, last.output), last.greylens)
    return Response(json.dumps(body), media_type="application/json")


class _CountRequests:
    """ASGI middleware: count every generation request and every error answer to one."""

    def __init__(self, app: Any, engine: AsyncEngine) -> None:
        self.app, self.engine = app, engine

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATE_PATHS:
            return await self.app(scope, receive, send)
        self.engine.count("requests_received")

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.engine.count("requests_failed")
            await send(message)

        await self.app(scope, receive, watch)


def build_app(engine: AsyncEngine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()  # shutting down is the owner's job (`serve`): tests reuse one engine
        yield

    app = FastAPI(title="greylens", lifespan=lifespan)
    app.add_middleware(_CountRequests, engine=engine)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> Response:
        return error_response(error.status, error.message, error.kind)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        return error_response(error.status_code, str(error.detail), "invalid_request_error")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await parse_body(request, CompletionRequest)
        return await _generate(request, engine, body, body.prompt, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await parse_body(request, ChatRequest)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        return await _generate(
            request,
            engine,
            body,
            messages,
            body.max_completion_tokens or body.max_tokens,
            chat=True,
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": engine.model_name,
            "object": "model",
            "created": engine.created,
            "owned_by": "greylens",
            "max_model_len": engine.engine.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        if not engine.alive():
            return error_response(503, "the engine thread is not running", "server_error")
        return Response(json.dumps({"status": "ok"}), media_type="application/json")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render_metrics(engine), media_type="text/plain; version=0.0.4")

    return app


def serve(cfg: ServerConfig, engine: LLMEngine | None = None) -> None:
    """Load the model, start the engine thread and serve until SIGINT/SIGTERM."""
    import uvicorn

    async_engine = AsyncEngine(
        engine or (lambda: LLMEngine(cfg.engine_config())), cfg.model, cfg.feature_hook
    )
    async_engine.start()
    try:
        uvicorn.run(build_app(async_engine), host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    finally:
        async_engine.shutdown()
