"""SAE features, probe scores and steering inside the engine, with the KV cache left intact.

    hook = FeatureHook(
        engine, saes=["out/sae/blocks.15.hook_resid_post"], probes=["out/probes/code"]
    )
    seq = engine.add_request(ids, params)
    ... engine.step() ...
    hook.features(seq.seq_id)   # per-token top-n codes per SAE and scores per probe

`FeatureHook` is an `EngineHook` (serve_hooks.engine_hook): it attaches itself to the engine
and the engine calls it, nothing else. Per hooked layer the hook reads the flattened batch once
(`on_layer`), encodes every row, and writes each request's rows at their positions
(`StepContext` maps rows to requests). Writes *overwrite*, so a chunk computed again after
preemption by recompute leaves no duplicates. Every full KV block that enters the prefix cache
gets a feature page beside it (`block_page`, keyed by the hook's version: the SAE and probe
weights); a prefix hit copies the pages into the new request (`on_admit`) instead of losing those
positions, and a cached block without a page for this version is not matched at all, so the
request recomputes rather than returning holes. Pages live on the trie node, so they are evicted
with the block and follow it to host memory and disk.

Which requests pay: with `watch_all=True` (the offline `LLM`) every request gets features; with
`watch_all=False` (the HTTP server) only requests passed to `watch(seq_id)` do, the others skip
the encode entirely and match cached blocks whether or not those carry pages.

Steering: `steer(vector, hook)` returns a cache key; requests added with it get `vector` added
to their rows at that hook. The key is a fingerprint of the intervention, so steered and
unsteered requests never share KV blocks. Read-only use never changes outputs.

Reasoning paths: with `graph=` (a graph autoencoder directory, optionally with `transition=`) the
graph autoencoder is the SAE at its hook, and for every token a watched request generates the
hook keeps what `graphs.explain` needs to explain that prediction (see `serve_hooks.paths`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence as Seq
from pathlib import Path

import torch
from torch import Tensor

from probes.activations import Ragged, load_encoder, pool
from probes.probe import Probe
from sae.identity import check_model_matches
from serve_hooks.context import StepContext
from serve_hooks.engine import LLMEngine
from serve_hooks.engine_hook import EngineHook, Page
from serve_hooks.features import RequestFeatures
from serve_hooks.paths import PathRecorder
from serve_hooks.sequence import Sequence


class FeatureHook(EngineHook):
    def __init__(
        self,
        engine: LLMEngine,
        saes: Seq[object | str | Path] = (),
        probes: Seq[Probe | str | Path] = (),
        top_n: int = 8,
        watch_all: bool = True,
        graph: str | Path | None = None,
        transition: str | Path | None = None,
    ) -> None:
        if top_n < 1:
            raise ValueError(f"top_n must be at least 1, got {top_n}")
        self.engine, self.top_n, self.watch_all = engine, top_n, watch_all
        self.watched: set[int] = set()  # requests that get features when watch_all is off
        self.paths = PathRecorder(engine, graph, transition) if graph is not None else None
        self.saes: dict[str, object] = {}  # hook -> encoder (an SAE, or the graph autoencoder)
        self.probes: dict[str, Probe] = {}
        sources = self._load_saes(saes, graph)
        self._load_probes(probes, sources)
        self._check_model()
        self.version = self._fingerprint()
        self.requests: dict[int, RequestFeatures] = {}
        self.stats: Counter[str] = Counter()  # encoded_rows, reused_tokens (from feature pages)
        self.steering: dict[str, tuple[str, Tensor]] = {}  # cache key -> (hook, vector)
        # Points whose rows are encoded and scored (and steered, when a vector sits there too).
        self._reads = set(self.saes) | {p.hook for p in self.probes.values()}
        # With a graph: where the target SAE and the final RMS are read at the prediction rows.
        self._path_points = set(self.paths.extra_hooks) if self.paths is not None else set()
        self._steer_only: set[str] = set()  # steering points that are read for nothing else
        self.points = self._reads | self._path_points
        engine.attach(self)

    def _load_saes(
        self, saes: Seq[object | str | Path], graph: str | Path | None
    ) -> dict[str, Path]:
        """Fill self.saes; returns hook -> directory of the encoders loaded from one."""
        sources = {}
        if self.paths is not None:
            self.saes[self.paths.source_hook] = self.paths.encoder
            sources[self.paths.source_hook] = Path(graph).resolve()
        for item in saes:
            encoder = load_encoder(item) if isinstance(item, str | Path) else item
            if encoder.cfg.hook in self.saes:
                raise ValueError(
                    f"two encoders read {encoder.cfg.hook} (an SAE and the graph, or two SAEs): "
                    "attach one per hook"
                )
            self.saes[encoder.cfg.hook] = encoder
            if isinstance(item, str | Path):
                sources[encoder.cfg.hook] = Path(item).resolve()
        return sources

    def _load_probes(self, probes: Seq[Probe | str | Path], sources: dict[str, Path]) -> None:
        """Fill self.probes (name -> probe); a sparse or graph probe reads the code of its own
        SAE, loaded here unless that SAE is the one attached at its hook."""
        for item in probes:
            probe = item if isinstance(item, Probe) else Probe.load(item)
            self.probes[probe.name or f"{probe.kind}-{len(self.probes)}"] = probe
        for name, probe in self.probes.items():
            if not probe.needs_code:
                continue
            if probe.hook not in self.saes:
                self.saes[probe.hook] = load_encoder(probe.sae)
            elif (
                probe.hook in sources
                and Path(probe.sae).exists()
                and Path(probe.sae).resolve() != sources[probe.hook]
            ):
                raise ValueError(
                    f"probe {name!r} reads the code of {probe.sae}, but {sources[probe.hook]} is "
                    f"attached at {probe.hook}: attach the probe's own SAE there or leave the "
                    "hook free"
                )

    def _check_model(self) -> None:
        """Every SAE and probe must come from the served model (sae.identity), before serving."""
        model = self.engine.model
        for hook, encoder in self.saes.items():
            cfg = encoder.cfg
            record, sha = getattr(cfg, "model_record", {}), getattr(cfg, "weights_sha256", "")
            check_model_matches(f"the SAE at {hook}", model, record, cfg.d_in, [hook], sha)
        for name, probe in self.probes.items():
            check_model_matches(
                f"probe {name!r}", model, probe.model_record, probe.d_model, [probe.hook]
            )

    def _fingerprint(self) -> str:
        """Identity of everything that produces pages: SAE weights, probe weights, top_n."""
        digest = hashlib.sha256(str(self.top_n).encode())
        for hook, encoder in sorted(self.saes.items()):
            module = encoder.model if hasattr(encoder, "model") else encoder  # graph AE or SAE
            digest.update(hook.encode())
            for name, tensor in sorted(module.state_dict().items()):
                digest.update(
                    name.encode() + tensor.detach().float().contiguous().numpy().tobytes()
                )
        for name, probe in sorted(self.probes.items()):
            digest.update(
                name.encode() + probe.weight.numpy().tobytes() + probe.features.numpy().tobytes()
            )
            digest.update(f"{probe.bias}".encode())
        return digest.hexdigest()[:16]

    # ------------------------------------------------------------------ the engine's calls

    def on_layer(self, point: str, rows: Tensor, ctx: StepContext) -> Tensor | None:
        steered = None
        if point in self._reads:
            chosen, index, offsets = self._rows(ctx)
            if chosen:
                x = (rows if index is None else rows[index]).float()  # [n_watched_rows, d_model]
                self._record(point, x, ctx, chosen, offsets)
            steered = self._steer(point, rows, ctx)
        if point in self._path_points:  # reads what later layers will see: steered rows
            chosen, _, _ = self._rows(ctx)
            if chosen:
                self.paths.keep_extra(point, rows if steered is None else steered, ctx, chosen)
        if point in self._steer_only:
            steered = self._steer(point, rows, ctx)
        return steered

    def page_version(self, seq: Sequence) -> str | None:
        return self.version if self.wants(seq) else None

    def block_page(self, seq: Sequence, start: int, end: int) -> Page | None:
        state = self.requests.get(seq.seq_id)
        return None if state is None else state.page(start, end)

    def on_admit(self, seq: Sequence, pages: list[Page]) -> None:
        if not self.wants(seq):
            return
        state = self.requests[seq.seq_id] = RequestFeatures(self.top_n)  # a fresh (re)admission
        if self.paths is not None:
            self.paths.reset(seq.seq_id)
        bs = self.engine.cache.block_size
        for i, page in enumerate(pages):
            state.fill(i * bs, page)
        self.stats["reused_tokens"] += len(pages) * bs

    def on_handoff(self, seq: Sequence) -> dict[str, Tensor]:
        """Prefill → decode: the prompt's per-token results travel with its KV blocks."""
        extras = {}
        state = self.requests.pop(seq.seq_id, None)
        if state is not None:
            extras.update(state.page(0, seq.num_computed))
        if self.paths is not None:  # the prompt's last row predicted the first token
            extras.update(self.paths.export(seq.seq_id))
        return extras

    def on_import(self, seq: Sequence, extras: dict[str, Tensor]) -> None:
        ours = {k: v for k, v in extras.items() if k.startswith(("codes.", "scores."))}
        if not ours:
            return  # the prefill side did not watch this request
        self.watched.add(seq.seq_id)
        self.requests[seq.seq_id] = RequestFeatures(self.top_n)
        self.requests[seq.seq_id].fill(0, ours)
        if self.paths is not None:
            self.paths.adopt(seq.seq_id, extras)

    def on_abort(self, seq_id: int) -> None:
        self.release(seq_id)

    # ------------------------------------------------------------------ per step

    def wants(self, seq: Sequence) -> bool:
        return self.watch_all or seq.seq_id in self.watched

    def _rows(self, ctx: StepContext) -> tuple[list[int], Tensor | None, list[int]]:
        """The watched requests of a step: their indices in ctx.seqs, the rows to encode (None:
        all of them) and where each one's rows start in those (offsets[j] for chosen[j])."""
        cu = ctx.cu_seqlens_q.tolist()
        chosen = [i for i, seq in enumerate(ctx.seqs) if self.wants(seq)]
        if len(chosen) == len(ctx.seqs):
            return chosen, None, cu
        spans = [torch.arange(cu[i], cu[i + 1]) for i in chosen]
        offsets = [0]
        for span in spans:
            offsets.append(offsets[-1] + len(span))
        return chosen, torch.cat(spans) if spans else None, offsets

    def _record(
        self, hook: str, x: Tensor, ctx: StepContext, chosen: list[int], offsets: list[int]
    ) -> None:
        self.stats["encoded_rows"] += x.shape[0]
        code = None
        if self.paths is not None and hook == self.paths.source_hook:
            graph_code = self.paths.source_code(x)
            code = graph_code.code
            self.paths.keep_sources(graph_code.code, ctx, chosen, offsets)
        elif hook in self.saes:
            code = self.saes[hook].encode(x)
        if code is not None:
            indices, values = code.top(self.top_n)  # [n_rows, top_n] each
        scores = {n: p.token_scores(x, code) for n, p in self.probes.items() if p.hook == hook}
        for j, i in enumerate(chosen):
            seq = ctx.seqs[i]
            state = self.requests.setdefault(seq.seq_id, RequestFeatures(self.top_n))
            lo, hi, start = offsets[j], offsets[j + 1], ctx.starts[i]
            if code is not None:
                state.write_codes(hook, start, indices[lo:hi], values[lo:hi])
            for name, s in scores.items():
                state.write_scores(name, start, s[lo:hi])

    def _steer(self, hook: str, rows: Tensor, ctx: StepContext) -> Tensor | None:
        cu = ctx.cu_seqlens_q.tolist()
        chosen = [
            (cu[i], cu[i + 1], self.steering[s.cache_key][1])
            for i, s in enumerate(ctx.seqs)
            if s.cache_key in self.steering and self.steering[s.cache_key][0] == hook
        ]
        if not chosen:
            return None  # read-only: the runner keeps its own tensor
        rows = rows.clone()
        for lo, hi, vector in chosen:
            rows[lo:hi] += vector.to(rows)
        return rows

    # ------------------------------------------------------------------ API

    def steer(self, vector: Tensor, hook: str) -> str:
        """A cache key for requests that get `vector` added at `hook` (a fingerprint of both)."""
        if not hook.endswith(("hook_resid_pre", "hook_resid_post")):
            raise ValueError(
                f"steering needs a residual hook (blocks.L.hook_resid_pre/post), got {hook!r}"
            )
        vector = vector.detach().float()
        d_model = self.engine.model.d_model
        if vector.shape != (d_model,):
            raise ValueError(
                f"steering vector has shape {tuple(vector.shape)}, expected ({d_model},)"
            )
        if hook not in self._reads | self._steer_only:  # read points steer in on_layer already
            self.engine.runner.check_point(hook)
            self._steer_only.add(hook)
            self.points.add(hook)
        digest = hashlib.sha256(hook.encode() + vector.contiguous().numpy().tobytes())
        key = "steer:" + digest.hexdigest()[:16]
        self.steering[key] = (hook, vector)
        return key

    def watch(self, seq_id: int) -> None:
        """Compute features for this request (needed only when watch_all is off); call it right
        after `add_request`, before the next step."""
        self.watched.add(seq_id)

    def features(self, seq_id: int) -> RequestFeatures | None:
        return self.requests.get(seq_id)

    def release(self, seq_id: int) -> RequestFeatures | None:
        """Drop (and return) a finished or cancelled request's per-token results."""
        self.watched.discard(seq_id)
        state = self.requests.pop(seq_id, None)
        if self.paths is not None:
            inputs = self.paths.release(seq_id)
            if state is not None:
                state.path_inputs = inputs
        return state

    def pooled(
        self, state: RequestFeatures, token_ids: list[int], names: Seq[str] | None = None
    ) -> dict[str, dict]:
        """Each probe's pooled score over every token the model read but a leading BOS (as Lens
        pools a text), its probability and whether it fired:
        {name: {score, probability, fired, threshold}}."""
        start = 1 if token_ids and token_ids[0] == self.engine.tokenizer.bos_token_id else 0
        summary = {}
        for name in self.probes if names is None else names:
            probe, scores = self.probes[name], state.scores[name][start : state.n]
            if len(scores) == 0:
                continue
            pooled = pool(Ragged(scores, torch.tensor([0, len(scores)])), probe.aggregation)[0]
            summary[name] = {
                "score": float(pooled),
                "probability": float(torch.sigmoid(pooled)),
                "fired": bool(probe.fires(pooled)),
                "threshold": probe.threshold,
            }
        return summary

    def explain(
        self, request: int | RequestFeatures, token_ids: list[int], after: int = -1, top: int = 5
    ) -> list[dict]:
        """Reasoning paths of a request's predictions at positions > `after` whose token is known
        (token_ids: prompt + generated so far); [] without a graph. `request`: a live request's
        seq_id, or what `release` returned."""
        if self.paths is None:
            return []
        inputs = (
            request.path_inputs
            if isinstance(request, RequestFeatures)
            else self.paths.pending.get(request, {})
        )
        return self.paths.explain({p: v for p, v in inputs.items() if p > after}, token_ids, top)

    def close(self) -> None:
        self.engine.detach(self)
