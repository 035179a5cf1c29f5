"""SAE features, probe scores and steering inside the engine, with the KV cache left intact.

    hook = FeatureHook(engine, saes=["out/sae/blocks.15.hook_resid_post"], probes=["out/probes/code"])
    seq = engine.add_request(ids, params)
    ... engine.step() ...
    hook.features(seq.seq_id)   # per-token top-n codes per SAE and scores per probe

Per hooked layer the hook reads the flattened batch once (the runner's hook point), encodes
every row, and writes each request's rows at their positions (`StepContext` maps rows to
requests). Writes *overwrite*, so a chunk computed again after preemption by recompute leaves
no duplicates. Every full KV block that enters the prefix cache gets a feature page beside it
(keyed by the hook's version: the SAE and probe weights); a prefix hit copies the pages into the
new request instead of losing those positions, and a cached block without a page for this
version is not matched at all, so the request recomputes rather than returning holes. Pages
live on the trie node, so they are evicted with the block and follow it to host memory and disk.

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
from serve_hooks.engine import LLMEngine
from serve_hooks.model_runner import StepContext
from serve_hooks.paths import PathRecorder
from serve_hooks.prefix_cache import PrefixNode
from serve_hooks.sequence import Sequence


class RequestFeatures:
    """Per-token results of one request: codes per SAE hook, scores per probe (grown on demand)."""

    def __init__(self, top_n: int) -> None:
        self.top_n, self.n = top_n, 0
        self.codes: dict[
            str, tuple[Tensor, Tensor]
        ] = {}  # hook -> (indices [cap, top_n], values [cap, top_n])
        self.scores: dict[str, Tensor] = {}  # probe name -> [cap]
        self.path_inputs: dict[
            int, dict
        ] = {}  # position -> what explaining its prediction needs (with a graph)
        self.predictions: list[dict] = []  # explained predictions (FeatureHook.explain fills it)
        self.triggers: dict[
            str, dict
        ] = {}  # probe -> pooled score, probability, fired (LLM.generate fills it)

    def _room(self, length: int) -> None:
        for key, (idx, val) in self.codes.items():
            if idx.shape[0] < length:
                self.codes[key] = (_grow(idx, length), _grow(val, length))
        for key, score in self.scores.items():
            if score.shape[0] < length:
                self.scores[key] = _grow(score, length)

    def write_codes(self, hook: str, start: int, idx: Tensor, val: Tensor) -> None:
        if hook not in self.codes:
            self.codes[hook] = (
                torch.zeros(0, self.top_n, dtype=torch.long),
                torch.zeros(0, self.top_n),
            )
        self._room(start + idx.shape[0])
        self.codes[hook][0][start : start + idx.shape[0]] = idx
        self.codes[hook][1][start : start + idx.shape[0]] = val
        self.n = max(self.n, start + idx.shape[0])

    def write_scores(self, probe: str, start: int, scores: Tensor) -> None:
        if probe not in self.scores:
            self.scores[probe] = torch.zeros(0)
        self._room(start + scores.shape[0])
        self.scores[probe][start : start + scores.shape[0]] = scores
        self.n = max(self.n, start + scores.shape[0])

    def page(self, start: int, end: int) -> dict[str, Tensor]:
        """Positions [start, end) as flat named tensors: `codes.indices.<hook>`, `codes.values.<hook>`,
        `scores.<probe>` (the form feature pages, handoffs and disk files all use)."""
        page = {}
        for hook, (idx, val) in self.codes.items():
            page[f"codes.indices.{hook}"], page[f"codes.values.{hook}"] = (
                idx[start:end].clone(),
                val[start:end].clone(),
            )
        for probe, scores in self.scores.items():
            page[f"scores.{probe}"] = scores[start:end].clone()
        return page

    def fill(self, start: int, page: dict[str, Tensor]) -> None:
        for name, tensor in page.items():
            kind, _, rest = name.partition(".")
            if kind == "scores":
                self.write_scores(rest, start, tensor)
            elif rest.startswith("indices."):
                hook = rest.removeprefix("indices.")
                self.write_codes(hook, start, tensor, page[f"codes.values.{hook}"])

    def to_json(self) -> dict:
        return {
            "codes": {
                h: {"indices": i[: self.n].tolist(), "values": v[: self.n].tolist()}
                for h, (i, v) in self.codes.items()
            },
            "probes": {p: s[: self.n].tolist() for p, s in self.scores.items()},
        }


def _grow(t: Tensor, length: int) -> Tensor:
    out = t.new_zeros((max(length, 2 * t.shape[0]), *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


class FeatureHook:
    def __init__(
        self,
        engine: LLMEngine,
        saes: Seq = (),
        probes: Seq = (),
        top_n: int = 8,
        watch_all: bool = True,
        graph: str | Path | None = None,
        transition: str | Path | None = None,
    ) -> None:
        if top_n < 1:
            raise ValueError(f"top_n must be at least 1, got {top_n}")
        self.engine, self.top_n, self.watch_all = engine, top_n, watch_all
        self.watched: set[int] = set()  # requests that get features when watch_all is off
        self.saes = {}  # hook -> encoder
        self.paths = PathRecorder(engine, graph, transition) if graph is not None else None
        if self.paths is not None:
            self.saes[self.paths.source_hook] = self.paths.encoder
        sources = (
            {self.paths.source_hook: Path(graph).resolve()} if self.paths is not None else {}
        )  # hook -> dir
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
        self.probes = {}
        for item in probes:
            probe = item if isinstance(item, Probe) else Probe.load(item)
            self.probes[probe.name or f"{probe.kind}-{len(self.probes)}"] = probe
        for (
            name,
            probe,
        ) in self.probes.items():  # a sparse or graph probe reads the code of its own SAE
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
                    f"probe {name!r} reads the code of {probe.sae}, but {sources[probe.hook]} is attached "
                    f"at {probe.hook}: attach the probe's own SAE there or leave the hook free"
                )
        self.version = self._fingerprint()
        self.requests: dict[int, RequestFeatures] = {}
        self.stats: Counter[str] = Counter()  # encoded_rows, reused_tokens (from feature pages)
        self.steering: dict[str, tuple[str, Tensor]] = {}  # cache key -> (hook, vector)
        self._hooked = set(self.saes) | {p.hook for p in self.probes.values()}
        self._remove = [engine.runner.add_hook(h, self._reader(h)) for h in sorted(self._hooked)]
        if (
            self.paths is not None
        ):  # the target SAE and the final RMS are read at the prediction rows
            self._remove += [
                engine.runner.add_hook(h, self._path_reader(h)) for h in self.paths.extra_hooks
            ]
        blocks = engine.cache
        blocks.page_filter = lambda seq, node: not self.wants(seq) or self.version in node.pages
        blocks.on_admit.append(self._admitted)
        blocks.on_commit.append(self._committed)
        engine.on_handoff.append(self._handoff)
        engine.on_import.append(self._imported)
        engine.on_abort.append(self.release)

    def _fingerprint(self) -> str:
        """Identity of everything that produces pages: SAE weights, probe weights, top_n."""
        digest = hashlib.sha256(str(self.top_n).encode())
        for hook, encoder in sorted(self.saes.items()):
            module = (
                encoder.model if hasattr(encoder, "model") else encoder
            )  # graph autoencoder or SAE
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

    def _reader(self, hook: str):
        def read(rows: Tensor, ctx: StepContext) -> Tensor | None:
            chosen, index, offsets = self._rows(ctx)
            if chosen:
                x = (rows if index is None else rows[index]).float()  # [n_watched_rows, d_model]
                self._record(hook, x, ctx, chosen, offsets)
            return self._steer(hook, rows, ctx, ctx.cu_seqlens_q.tolist())

        return read

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

    def _path_reader(self, hook: str):
        def read(rows: Tensor, ctx: StepContext) -> None:
            chosen, _, _ = self._rows(ctx)
            if chosen:
                self.paths.keep_extra(hook, rows, ctx, chosen)

        return read

    def _steer(self, hook: str, rows: Tensor, ctx: StepContext, cu: list[int]) -> Tensor | None:
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

    def _admitted(self, seq: Sequence, matched: list[PrefixNode]) -> None:
        if not self.wants(seq):
            return
        state = self.requests[seq.seq_id] = RequestFeatures(self.top_n)  # a fresh (re)admission
        if self.paths is not None:
            self.paths.reset(seq.seq_id)
        bs = self.engine.blocks.block_size
        for i, node in enumerate(matched):
            state.fill(i * bs, node.pages[self.version])
        self.stats["reused_tokens"] += len(matched) * bs

    def _committed(self, seq: Sequence, block_index: int, node: PrefixNode) -> None:
        if self.version not in node.pages and seq.seq_id in self.requests:
            bs = self.engine.blocks.block_size
            node.pages[self.version] = self.requests[seq.seq_id].page(
                block_index * bs, (block_index + 1) * bs
            )

    def _handoff(self, seq: Sequence, handoff) -> None:
        """Prefill → decode: the prompt's per-token results travel with its KV blocks."""
        state = self.requests.pop(seq.seq_id, None)
        if state is not None:
            handoff.extras.update(state.page(0, handoff.num_computed))
        if self.paths is not None:  # the prompt's last row predicted the first token
            handoff.extras.update(self.paths.export(seq.seq_id))

    def _imported(self, seq: Sequence, handoff) -> None:
        if not any(name.startswith(("codes.", "scores.")) for name in handoff.extras):
            return  # the prefill side did not watch this request
        self.watched.add(seq.seq_id)
        self.requests[seq.seq_id] = RequestFeatures(self.top_n)
        self.requests[seq.seq_id].fill(
            0, {k: v for k, v in handoff.extras.items() if k.startswith(("codes.", "scores."))}
        )
        if self.paths is not None:
            self.paths.adopt(seq.seq_id, handoff.extras)

    # ------------------------------------------------------------------ API

    def steer(self, vector: Tensor, hook: str) -> str:
        """A cache key for requests that get `vector` added at `hook` (a fingerprint of both)."""
        if not hook.endswith(("hook_resid_pre", "hook_resid_post")):
            raise ValueError(
                f"steering needs a residual hook (blocks.L.hook_resid_pre/post), got {hook!r}"
            )
        vector = vector.detach().float()
        if vector.shape != (self.engine.model.d_model,):
            raise ValueError(
                f"steering vector has shape {tuple(vector.shape)}, expected ({self.engine.model.d_model},)"
            )
        key = (
            "steer:"
            + hashlib.sha256(hook.encode() + vector.contiguous().numpy().tobytes()).hexdigest()[:16]
        )
        self.steering[key] = (hook, vector)
        if hook not in self._hooked:  # read hooks steer too; other points get a steering-only hook
            self._hooked.add(hook)
            self._remove.append(
                self.engine.runner.add_hook(
                    hook, lambda rows, ctx: self._steer(hook, rows, ctx, ctx.cu_seqlens_q.tolist())
                )
            )
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
        pools a text), its probability and whether it fired: {name: {score, probability, fired, threshold}}."""
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
        for remove in self._remove:
            remove()
        self.engine.cache.page_filter = None
        self.engine.cache.on_admit.remove(self._admitted)
        self.engine.cache.on_commit.remove(self._committed)
        self.engine.on_handoff.remove(self._handoff)
        self.engine.on_import.remove(self._imported)
        self.engine.on_abort.remove(self.release)
