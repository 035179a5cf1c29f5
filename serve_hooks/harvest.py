"""Harvest from live traffic: residual streams of served requests into an activation store.

    harvester = TrafficHarvester(
        engine, "out/live-store", hooks=["blocks.15.hook_resid_post"], sample=0.1
    )
    ... serve ...
    harvester.close()   # last partial shard, manifest marked complete

The store has the format `python -m sae harvest` writes (manifest + safetensors shards with
token ids, document ids — here the request id — and positions), so `python -m sae train` trains
an SAE on what the model really sees in production. A request is sampled by a hash of its id
(`sample` of them); each token is recorded once, the first time its position is computed, so a
chunk recomputed after preemption adds nothing twice. Full shards are written by a background
thread, off the engine's critical path.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from pathlib import Path

import torch
from torch import Tensor

from sae.harvest import DTYPES
from sae.store import StoreManifest, StoreWriter
from serve_hooks.context import StepContext
from serve_hooks.engine import LLMEngine
from serve_hooks.engine_hook import EngineHook


class TrafficHarvester(EngineHook):
    def __init__(
        self,
        engine: LLMEngine,
        out: str | Path,
        hooks: list[str],
        sample: float = 1.0,
        shard_tokens: int = 65536,
        dtype: str = "float16",
    ) -> None:
        if not 0.0 < sample <= 1.0:
            raise ValueError(f"sample must be in (0, 1], got {sample}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        model = engine.model
        manifest = StoreManifest(
            model=model.name,
            weights_sha256=model.weights_sha256,
            hooks=list(hooks),
            d_model=model.d_model,
            dtype=dtype,
            context_size=engine.max_model_len,
            corpus="live-traffic",
            seed=0,
            n_tokens_target=0,
            windows_per_shard=0,
            keep_bos=True,
            model_record=model.identity(),
        )
        self.writer = StoreWriter.open(out, manifest)
        self.engine, self.hooks, self.points = engine, list(hooks), set(hooks)
        self.sample, self.shard_tokens, self.dtype = sample, shard_tokens, DTYPES[dtype]
        self.last_hook = max(self.hooks, key=lambda h: (int(h.split(".")[1]), h))
        self.seen: dict[int, int] = {}  # seq_id -> positions already recorded
        self.step_rows: dict[str, Tensor] = {}
        self.buffer: list[dict[str, Tensor]] = []
        self.buffered = 0
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(
            target=self._write_loop, name="greylens-live-harvest", daemon=True
        )
        self.thread.start()
        engine.attach(self)

    def _sampled(self, seq_id: int) -> bool:
        digest = hashlib.sha256(str(seq_id).encode()).digest()
        return int.from_bytes(digest[:4], "little") / 2**32 < self.sample

    def on_layer(self, point: str, rows: Tensor, ctx: StepContext) -> None:
        self.step_rows[point] = rows
        if point == self.last_hook:  # every hook of this step has been seen
            self._take(ctx)
            self.step_rows = {}

    def _take(self, ctx: StepContext) -> None:
        cu = ctx.cu_seqlens_q.tolist()
        chosen, meta = [], {"token_ids": [], "doc_ids": [], "positions": []}
        for i, seq in enumerate(ctx.seqs):
            start, n = ctx.starts[i], cu[i + 1] - cu[i]
            if not self._sampled(seq.seq_id):
                continue
            first_new = max(start, self.seen.get(seq.seq_id, 0))  # recomputed positions are skipped
            if first_new >= start + n:
                continue
            self.seen[seq.seq_id] = start + n
            chosen.append(torch.arange(cu[i] + first_new - start, cu[i + 1]))
            meta["token_ids"] += seq.token_ids[first_new : start + n]
            meta["doc_ids"] += [seq.seq_id] * (start + n - first_new)
            meta["positions"] += list(range(first_new, start + n))
        if not chosen:
            return
        rows = torch.cat(chosen)
        part = {k: torch.tensor(v, dtype=torch.long) for k, v in meta.items()}
        part.update({h: self.step_rows[h][rows].to("cpu", self.dtype) for h in self.hooks})
        self.buffer.append(part)
        self.buffered += rows.numel()
        if self.buffered >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            self.jobs.put({k: torch.cat([p[k] for p in self.buffer]) for k in self.buffer[0]})
            self.buffer, self.buffered = [], 0

    def _write_loop(self) -> None:
        while (shard := self.jobs.get()) is not None:
            self.writer.write_shard(shard)

    def close(self) -> StoreManifest:
        """Write what is buffered, wait for the writer, mark the store complete."""
        self.engine.detach(self)
        self._flush()
        self.jobs.put(None)
        self.thread.join()
        self.writer.finish()
        return self.writer.manifest
