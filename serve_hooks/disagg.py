"""Prefill/decode disaggregation: M prefill and N decode engines in separate processes.

    llm = DisaggregatedLLM("smollm2-135m", n_prefill=1, n_decode=2, block_size=16,
                           saes=["out/sae/blocks.15.hook_resid_post"])  # optional: features
    outs = llm.generate(prompts, SamplingParams(max_tokens=64))
    outs[0]   # {tokens, reason, text, features}
    llm.close()

Ranks of one torch.distributed group (gloo here, NCCL on GPUs): 0 is this process (the router),
1..M prefill workers, M+1..M+N decode workers. A request goes to a prefill worker (round robin),
which runs it with continuous batching until its first token, then sends the prompt's KV blocks,
the first token and the request's sampling-generator state to a decode worker (round robin),
which imports them into its own pool and decodes from exactly there; finished requests go back
to rank 0. With SAEs / probes each worker runs a `FeatureHook`; the prompt's feature pages
travel with its KV blocks and the decode side returns per-token features for the whole text.
Every message is a small header tensor, a JSON body (no pickle) and optional tensors,
sent with isend so no process ever blocks on a busy peer.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from sae.models import load_model
from serve_hooks.config import EngineConfig
from serve_hooks.engine import Handoff, LLMEngine, RequestOutput
from serve_hooks.hook import FeatureHook
from serve_hooks.sequence import SamplingParams

ROUTER = 0
STORE_TIMEOUT_S = 300  # a worker that has not joined after this long has failed to start


class Link:
    """Messages between ranks: JSON bodies through the TCPStore (the control plane), tensors
    through torch.distributed send/recv (the data plane, NCCL on GPUs).

    A message to rank d is numbered by an atomic counter `n/d` in the store; its body sits under
    `m/d/<n>` and names the sender and the shapes of the tensors that follow with tag n. Receivers
    poll their counter (gloo's irecv does not report completion until waited on, so it cannot be
    polled); senders use isend, so nobody ever blocks on a busy peer."""

    def __init__(self, store: dist.Store, rank: int) -> None:
        self.store, self.rank, self.seen = store, rank, 0
        self.pending: list[tuple[object, torch.Tensor]] = []  # isends in flight (kept alive)

    def send(self, dst: int, body: dict, tensors: tuple[torch.Tensor, ...] = ()) -> None:
        tensors = tuple(t.contiguous() for t in tensors)
        number = self.store.add(f"n/{dst}", 1)
        specs = [[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in tensors]
        self.store.set(
            f"m/{dst}/{number}", json.dumps({**body, "_src": self.rank, "_tensors": specs})
        )
        for t in tensors:
            self.pending.append((dist.isend(t, dst=dst, tag=number), t))
        self.pending = [(w, t) for w, t in self.pending if not w.is_completed()]

    def poll(self) -> list[tuple[dict, list[torch.Tensor]]]:
        """Every message that has arrived, in order (non-blocking when there is none)."""
        got = []
        count = self.store.add(f"n/{self.rank}", 0)
        while self.seen < count:
            self.seen += 1
            key = f"m/{self.rank}/{self.seen}"
            body = json.loads(self.store.get(key))
            self.store.delete_key(key)
            tensors = []
            for shape, dtype in body.pop("_tensors"):
                tensor = torch.empty(shape, dtype=getattr(torch, dtype))
                dist.recv(tensor, src=body["_src"], tag=self.seen)
                tensors.append(tensor)
            got.append((body, tensors))
        return got

    def flush(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending = []


# --------------------------------------------------------------------------- workers


def _worker(
    index: int, world: int, settings: dict, weights: str, port: int, hook_spec: dict
) -> None:
    rank = index + 1  # start_processes numbers workers from 0; rank 0 is the router
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    engine = _load_engine(settings, weights)
    hook = None
    if hook_spec.get("saes") or hook_spec.get("probes"):
        hook = FeatureHook(
            engine,
            hook_spec.get("saes", ()),
            hook_spec.get("probes", ()),
            hook_spec.get("top_n", 8),
        )
    store = dist.TCPStore(
        "127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=STORE_TIMEOUT_S)
    )
    dist.init_process_group(_backend(), store=store, rank=rank, world_size=world)
    link = Link(store, rank)
    routes: dict[int, tuple[str, int]] = {}  # local seq_id -> (request id, decode rank)
    running = True
    while running or engine.has_unfinished():
        for body, tensors in link.poll():
            running = _receive(engine, body, tensors, routes) and running
        if not engine.has_unfinished():
            time.sleep(0.001)
            continue
        for out in engine.step():
            if out.finished:
                features = hook.release(out.seq_id) if hook is not None else None
                _forward(
                    link,
                    out,
                    *routes.pop(out.seq_id),
                    features.to_json() if features is not None else None,
                )
    link.flush()
    dist.barrier()
    dist.destroy_process_group()


def _receive(
    engine: LLMEngine, body: dict, tensors: list[torch.Tensor], routes: dict[int, tuple[str, int]]
) -> bool:
    """Act on one message from the router or a prefill worker; False when told to stop."""
    if body["op"] == "stop":
        return False
    if body["op"] == "prefill":
        params = SamplingParams(**body["params"])
        seq = engine.add_request(body["prompt"], params, body["cache_key"], prefill_only=True)
        routes[seq.seq_id] = (body["id"], body["decode"])
        return True
    # "decode": a handed-over request; its KV, generator state, then feature pages if any.
    k, v, generator_state, *pages = tensors
    extras = dict(zip(body["extras"], pages, strict=True))
    params = SamplingParams(**body["params"])
    handoff = Handoff(k, v, body["computed"], generator_state, params, body["cache_key"], extras)
    seq = engine.add_prefilled(body["prompt"], body["output"], handoff)
    routes[seq.seq_id] = (body["id"], ROUTER)
    return True


def _forward(
    link: Link, out: RequestOutput, request_id: str, dst: int, features: dict | None
) -> None:
    if out.handoff is None:  # finished (EOS, stop, max_tokens) — straight back to the router
        link.send(
            ROUTER,
            {
                "op": "done",
                "id": request_id,
                "tokens": out.token_ids,
                "reason": out.finish_reason,
                "text": out.text,
                "cached": out.num_cached_tokens,
                "features": features,
            },
        )
        return
    h = out.handoff
    link.send(
        dst,
        {
            "op": "decode",
            "id": request_id,
            "prompt": out.prompt_token_ids,
            "output": out.token_ids,
            "params": asdict(h.params),
            "computed": h.num_computed,
            "cache_key": h.cache_key,
            "extras": list(h.extras),
        },
        (h.k, h.v, h.generator_state, *h.extras.values()),
    )


def _load_engine(settings: dict, weights: str) -> LLMEngine:
    cfg = EngineConfig(**settings)
    model = load_model(cfg.model, cfg.device, cfg.dtype)
    if weights:
        missing, unexpected = model.fast.load_state_dict(load_file(weights), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise ValueError(
                f"weights {weights} do not fit {cfg.model}: missing {missing}, "
                f"unexpected {unexpected}"
            )
    return LLMEngine(cfg, model)


# --------------------------------------------------------------------------- the router


class DisaggregatedLLM:
    def __init__(
        self,
        model: str = "smollm2-135m",
        n_prefill: int = 1,
        n_decode: int = 1,
        weights: str = "",
        saes: tuple[str, ...] = (),
        probes: tuple[str, ...] = (),
        top_n: int = 8,
        **settings,
    ) -> None:
        if n_prefill < 1 or n_decode < 1:
            raise ValueError(
                f"need at least one prefill and one decode worker, got {n_prefill} and {n_decode}"
            )
        self.n_prefill, self.n_decode = n_prefill, n_decode
        self.world = 1 + n_prefill + n_decode
        port = _free_port()
        settings = {**settings, "model": model}
        EngineConfig(**settings)  # bad settings fail here, before any process starts
        store = dist.TCPStore(
            "127.0.0.1",
            port,
            self.world,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=STORE_TIMEOUT_S),
        )
        hook_spec = {
            "saes": [str(s) for s in saes],
            "probes": [str(p) for p in probes],
            "top_n": top_n,
        }
        self.context = mp.start_processes(
            _worker,
            args=(self.world, settings, weights, port, hook_spec),
            nprocs=self.world - 1,
            join=False,
            start_method="spawn",
        )
        dist.init_process_group(_backend(), store=store, rank=ROUTER, world_size=self.world)
        self.link = Link(store, ROUTER)
        self.next_id = 0

    def generate(
        self,
        prompts: list[list[int] | str],
        params: SamplingParams | None = None,
        cache_key: str = "",
    ) -> list[dict]:
        """Run prompts through prefill and decode workers; returns {tokens, reason, text} per
        prompt, in order."""
        params = params or SamplingParams()
        ids = []
        for i, prompt in enumerate(prompts):
            request_id = str(self.next_id)
            self.next_id += 1
            prefill, decode = 1 + i % self.n_prefill, 1 + self.n_prefill + i % self.n_decode
            self.link.send(
                prefill,
                {
                    "op": "prefill",
                    "id": request_id,
                    "prompt": prompt,
                    "params": asdict(params),
                    "decode": decode,
                    "cache_key": cache_key,
                },
            )
            ids.append(request_id)
        done: dict[str, dict] = {}
        while len(done) < len(ids):
            for body, _ in self.link.poll():
                done[body["id"]] = {
                    k: body[k] for k in ("tokens", "reason", "text", "cached", "features")
                }
            if self.context.join(timeout=0.001):
                raise RuntimeError("a worker exited early")
        return [done[i] for i in ids]

    def close(self) -> None:
        for rank in range(1, self.world):
            self.link.send(rank, {"op": "stop"})
        self.link.flush()
        dist.barrier()
        dist.destroy_process_group()
        while not self.context.join(timeout=30):
            pass


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
