"""The engine's one thread: HTTP handlers hand it requests and aborts through a queue.

`LLMEngine` is not thread-safe, so `AsyncEngine` owns it: the thread admits queued requests,
steps the engine while there is work and hands each output to the waiting handler's asyncio
queue with `call_soon_threadsafe`. `Detokenizer` turns generated ids into streaming text deltas.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from serve_hooks.api import APIError, GreylensOptions, chat_prompt
from serve_hooks.engine import LLMEngine, RequestOutput
from serve_hooks.hook import FeatureHook
from serve_hooks.report import Reporter
from serve_hooks.sequence import SamplingParams

log = logging.getLogger("serve_hooks.server")


# --------------------------------------------------------------------------- the engine thread


@dataclass
class Chunk:
    output: RequestOutput
    delta: str  # new text since the previous chunk (streaming requests only)
    greylens: dict | None = (
        None  # new per-token results (requests with a greylens field; see report.py)
    )


class Detokenizer:
    """Text deltas for streaming: decode every generated id each time and emit the new suffix, so
    multi-token characters and merges come out right. Text that may still change is held back: a
    trailing incomplete UTF-8 character ("\\ufffd") and a tail that could start a stop string."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer, self.stop, self.sent = tokenizer, stop, ""

    def delta(self, out: RequestOutput) -> str:
        text = out.text if out.finished else self._settled(out.token_ids)
        if not text.startswith(self.sent):  # an earlier piece decoded differently: wait for more
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new

    def _settled(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:  # a guard: the engine finishes a request on the step a stop string appears
            return text[:cut]
        hold = max(
            (n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0
        )
        return text[: len(text) - hold].rstrip("\ufffd")


@dataclass(eq=False)
class Handle:
    """One HTTP request's side of the engine: what to run and the queue its results arrive on."""

    prompt: str | list[int] | list[dict[str, str]]  # text, token ids, or chat messages
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    chat: bool = False
    fill: bool = False  # max_tokens: whatever the context and the pool leave after the prompt
    stream: bool = False
    seq_id: int | None = None
    prompt_tokens: int = 0
    done: bool = False
    detok: Detokenizer | None = None
    greylens: GreylensOptions | None = None
    reporter: Reporter | None = None


class AsyncEngine:
    """Owns an `LLMEngine` and the one thread that may call it; handlers talk to it by queue."""

    def __init__(
        self,
        engine: LLMEngine | Callable[[], LLMEngine],
        model_name: str | None = None,
        hook: FeatureHook | Callable[[LLMEngine], FeatureHook] | None = None,
    ) -> None:
        """hook: the FeatureHook that answers `greylens` requests (or a function building it on the
        engine); it must watch only the requests that ask (watch_all=False)."""
        self._host: tuple[threading.Thread, queue.SimpleQueue] | None = None
        # A factory: build the engine on the thread that will run it.
        if not isinstance(engine, LLMEngine):
            engine, self._host = _build_on_thread(engine)
        self.engine = engine
        self.hook = hook(engine) if hook is not None and not isinstance(hook, FeatureHook) else hook
        if self.hook is not None and self.hook.watch_all:
            raise ValueError(
                "the server's FeatureHook must have watch_all=False: requests without a greylens "
                "field must not pay for features"
            )
        self.model_name = model_name or engine.cfg.model
        self.created = int(time.time())
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()  # counters are bumped by handlers and the engine thread
        self._commands: queue.SimpleQueue[tuple[str, Handle]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._live: dict[int, Handle] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.snapshot: dict[str, int] = {}
        self._publish()

    def start(self) -> None:
        if self._thread is None and self._host is not None:
            self._thread, work = self._host
            work.put(self._run)
        elif self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._refuse_queued()

    def alive(self) -> bool:
        return not self._stopping and (self._thread is None or self._thread.is_alive())

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def metric_values(self) -> dict[str, int]:
        with self._lock:
            return {**self.counters, **self.snapshot}

    # ------------------------------------------------------------------ handler side (event loop)

    async def submit(
        self,
        prompt: str | list[int] | list[dict[str, str]],
        params: SamplingParams,
        *,
        chat: bool = False,
        fill: bool = False,
        stream: bool = False,
        greylens: GreylensOptions | None = None,
    ) -> Handle:
        """Queue a request; returns once the engine accepted it, raises APIError if it refused."""
        if self._stopping:
            raise APIError(503, "the server is shutting down", "server_error")
        if greylens is not None:
            self.check_greylens(greylens)
        self.start()
        handle = Handle(
            prompt,
            params,
            asyncio.get_running_loop(),
            asyncio.Queue(),
            chat,
            fill,
            stream,
            greylens=greylens,
        )
        self._commands.put(("add", handle))
        self._wake.set()
        try:
            first = await handle.queue.get()  # None: accepted, else the refusal
        except asyncio.CancelledError:
            # The handler was cancelled: do not run a request nobody reads.
            self.abort(handle)
            raise
        if first is not None:
            raise first
        return handle

    def check_greylens(self, options: GreylensOptions) -> None:
        """Refuse what this server cannot answer, naming how to start it so that it can."""
        hook = self.hook
        if hook is None:
            raise APIError(
                400,
                "this server has no SAE, probe or graph attached; start it with --sae DIR, "
                "--probe DIR or --graph DIR to answer greylens requests",
            )
        if options.features is not None and options.features > hook.top_n:
            raise APIError(
                400,
                f"greylens.features={options.features} exceeds the server's --top-n {hook.top_n}",
            )
        unknown = sorted(set(options.probes or ()) - set(hook.probes))
        if unknown:
            raise APIError(
                400, f"unknown probes {unknown}; this server has {sorted(hook.probes) or 'none'}"
            )
        if options.paths and hook.paths is None:
            raise APIError(
                400, "greylens.paths needs a server started with --graph DIR (a graph autoencoder)"
            )

    async def results(self, handle: Handle) -> AsyncIterator[Chunk]:
        """The request's outputs, the last one finished. Abort the handle if you stop early."""
        while not handle.done:
            item = await handle.queue.get()
            if isinstance(item, APIError):
                handle.done = True
                raise item
            handle.done = item.output.finished
            yield item

    def abort(self, handle: Handle) -> None:
        if not handle.done:
            handle.done = True
            self.count("requests_aborted")
            self._commands.put(("abort", handle))
            self._wake.set()

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()  # before draining: a submit after the drain sets it again
            busy = stalled = False
            try:
                self._drain()
                busy = self.engine.has_unfinished()
                if busy:
                    steps = self.engine.stats["steps"]
                    self._step()
                    stalled = self.engine.stats["steps"] == steps  # nothing was schedulable
            except Exception:  # an engine bug: fail what is in flight, keep serving new requests
                log.exception("the engine failed")
                self._fail_live(APIError(500, "the engine failed on this request", "server_error"))
            if not busy:
                self._publish()
                self._wake.wait()
            elif stalled:
                self._wake.wait(0.05)  # do not spin while nothing can run
        self._fail_live(
            APIError(503, "the server shut down before the request finished", "server_error")
        )
        self._refuse_queued()

    def _queued(self) -> Iterator[tuple[str, Any]]:
        """The commands handlers have queued so far (adds and aborts), in order."""
        while True:
            try:
                yield self._commands.get_nowait()
            except queue.Empty:
                return

    def _drain(self) -> None:
        for command, handle in self._queued():
            if command == "add":
                self._admit(handle)
            elif handle.seq_id is not None and self._live.pop(handle.seq_id, None) is not None:
                self.engine.abort(handle.seq_id)

    def _admit(self, handle: Handle) -> None:
        tokenizer = self.engine.tokenizer
        try:
            prompt, special = (
                chat_prompt(tokenizer, handle.prompt) if handle.chat else (handle.prompt, True)
            )
            ids = (
                tokenizer(prompt, add_special_tokens=special)["input_ids"]
                if isinstance(prompt, str)
                else prompt
            )
            params = handle.params
            if handle.fill:  # the room left after the prompt, in the context and in the pool
                room = min(
                    self.engine.max_model_len,
                    self.engine.blocks.num_blocks * self.engine.cfg.block_size,
                )
                params = replace(params, max_tokens=max(1, room - len(ids)))
            seq = self.engine.add_request(ids, params)
        except ValueError as error:  # the engine's reasons for refusing a prompt
            return self._send(handle, APIError(400, str(error)))
        except APIError as error:
            return self._send(handle, error)
        except Exception:  # a bug, not the request's fault: answer this one, the others go on
            log.exception("admitting a request failed")
            return self._send(
                handle, APIError(500, "the engine failed to admit this request", "server_error")
            )
        handle.seq_id, handle.prompt_tokens = seq.seq_id, len(ids)
        handle.detok = Detokenizer(tokenizer, params.stop) if handle.stream else None
        if handle.greylens is not None:
            self.hook.watch(seq.seq_id)
            handle.reporter = Reporter(self.hook, tokenizer, handle.greylens, len(ids))
        self._live[seq.seq_id] = handle
        self.count("prompt_tokens", len(ids))
        self._send(handle, None)  # accepted

    def _step(self) -> None:
        outputs = self.engine.step()
        self._publish()  # before the outputs go out: a client that saw its answer sees fresh gauges
        for out in outputs:
            handle = self._live.get(out.seq_id)
            if handle is None:  # aborted while the step ran
                continue
            self.count("generation_tokens", len(out.new_token_ids))
            if out.finished:
                del self._live[out.seq_id]
            greylens = None
            if handle.reporter is not None and (handle.stream or out.finished):
                greylens = handle.reporter.delta(
                    out.seq_id, out.prompt_token_ids + out.token_ids, out.finished
                )
            self._send(
                handle, Chunk(out, handle.detok.delta(out) if handle.detok else "", greylens)
            )

    def _fail_live(self, error: APIError) -> None:
        for seq_id, handle in list(self._live.items()):
            try:
                self.engine.abort(seq_id)
            except Exception:  # already failing: answering the client matters more
                log.exception("abort failed")
            self._send(handle, error)
        self._live.clear()

    def _refuse_queued(self) -> None:
        """Answer requests queued after the loop stopped (shutdown races with submit)."""
        for command, handle in self._queued():
            if command == "add":
                self._send(handle, APIError(503, "the server is shutting down", "server_error"))

    def _send(self, handle: Handle, item: Chunk | APIError | None) -> None:
        try:
            handle.loop.call_soon_threadsafe(handle.queue.put_nowait, item)
        except RuntimeError:  # the handler's event loop is gone: nobody will read this request
            if handle.seq_id is not None and self._live.pop(handle.seq_id, None) is not None:
                self.engine.abort(handle.seq_id)

    def _publish(self) -> None:
        """Engine gauges for /metrics, read here because only this thread may touch the engine."""
        engine, blocks = self.engine, self.engine.blocks
        self.snapshot = {
            "requests_running": len(engine.scheduler.running),
            "requests_waiting": len(engine.scheduler.waiting),
            "kv_blocks_total": blocks.num_blocks,
            "kv_blocks_free": blocks.num_available,
            "engine_steps": engine.stats["steps"],
            "prefix_cache_hit_tokens": engine.cache.stats["prefix_hit_tokens"],
        }


# The engine's torch work should stay on one OS thread: CPU torch runs each thread's ops on that
# thread's own OpenMP team, and a second team (the one that loaded the model on the main thread)
# spins on the same cores and slows decoding. So `serve` passes a factory and the engine is built
# on the thread that later runs its loop.


def _build_on_thread(
    factory: Callable[[], LLMEngine],
) -> tuple[LLMEngine, tuple[threading.Thread, queue.SimpleQueue]]:
    """Build an engine on a new thread that then waits for the loop it should run."""
    ready: queue.SimpleQueue = queue.SimpleQueue()
    work: queue.SimpleQueue = queue.SimpleQueue()

    def host() -> None:
        try:
            ready.put(factory())
        except BaseException as error:  # hand the failure to the caller
            ready.put(error)
            return
        work.get()()  # the engine loop, once start() is called

    thread = threading.Thread(target=host, name="engine", daemon=True)
    thread.start()
    result = ready.get()
    if isinstance(result, BaseException):
        raise result
    return result, (thread, work)
