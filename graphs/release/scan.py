"""The two streamed passes of a release export: per-feature statistics, then token-level contexts.

    scan      one ordered pass over the store through the SAE: density, mean / max activation, a
              log-spaced activation histogram, FVU / L0 / dead counts, the top-k activating tokens
              and a uniform reservoir of firing tokens per feature (for quantile samples)
    contexts  the window of store rows around each chosen token, re-encoded to read the feature's
              activation on every token of the window

Memory is bounded by the number of features, never by the number of tokens: both the top-k and the
reservoir are a fixed [n_latents, K] table merged batch by batch (`KeepBest`); the reservoir keeps
the K firing tokens with the largest hash of (row, feature), a uniform sample without replacement
that is a pure function of the data (so a resumed scan keeps exactly what an unbroken one keeps).
Both passes checkpoint into safetensors (state tensors + JSON metadata) every few batches; a
killed export resumes at the last checkpoint and redoes only the batches after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from graphs.model import locate
from sae.atomic import atomic_save_tensors
from sae.metrics import FVUAccumulator
from sae.sae import SAE
from sae.store import ActivationStore

SCAN_FILE, CONTEXTS_FILE = "scan.safetensors", "contexts.safetensors"
HASH_MULTIPLIER = 0x9E3779B97F4A7C15 & ((1 << 62) - 1)  # odd: a bijection mod 2^62


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["state"])


class KeepBest:
    """The K entries with the largest key per feature, merged batch by batch in O(nK + nnz)."""

    def __init__(self, n: int, k: int) -> None:
        self.n, self.k = n, k
        self.keys = torch.full((n, k), -torch.inf, dtype=torch.float64)  # [n, K] -inf: empty slot
        self.rows = torch.full((n, k), -1, dtype=torch.int64)  # [n, K] global store row
        self.values = torch.zeros(n, k)  # [n, K] activation

    def update(
        self, cols: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, values: torch.Tensor
    ) -> None:
        """cols, keys, rows, values: [nnz] one entry per (token, feature) of the batch."""
        all_cols = torch.cat([torch.arange(self.n).repeat_interleave(self.k), cols])
        all_keys = torch.cat([self.keys.flatten(), keys.double()])
        by_key = torch.argsort(-all_keys, stable=True)
        order = by_key[torch.argsort(all_cols[by_key], stable=True)]  # by feature, best first
        per_col = torch.bincount(all_cols, minlength=self.n)  # each ≥ K: the table is always full
        rank = torch.arange(len(order)) - (torch.cumsum(per_col, 0) - per_col).repeat_interleave(
            per_col
        )
        keep = order[rank < self.k]  # exactly n·K, feature-major
        self.keys = all_keys[keep].view(self.n, self.k)
        self.rows = torch.cat([self.rows.flatten(), rows])[keep].view(self.n, self.k)
        self.values = torch.cat([self.values.flatten(), values.float()])[keep].view(self.n, self.k)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.keys": self.keys,
            f"{prefix}.rows": self.rows,
            f"{prefix}.values": self.values,
        }

    def restore(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        self.keys, self.rows, self.values = (
            tensors[f"{prefix}.{k}"] for k in ("keys", "rows", "values")
        )


def row_hash(rows: torch.Tensor, cols: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """[nnz] pseudo-random keys in [0, 1) from (row, feature): the reservoir's sampling order."""
    # int64, no overflow issue
    mixed = ((rows * n + cols + seed * 7919) * HASH_MULTIPLIER) % (1 << 62)
    mixed = mixed ^ (mixed >> 29)
    return (mixed % (1 << 52)).double() / float(1 << 52)


@dataclass
class ScanState:
    """Everything the scan accumulates; a pure function of (SAE, store rows scanned so far)."""

    fire_counts: torch.Tensor  # [n] int64 tokens each feature fired on
    act_sum: torch.Tensor  # [n] float64 sum of its activations where it fired
    act_max: torch.Tensor  # [n] float32
    hist: torch.Tensor  # [n, bins] int64 counts per log-spaced activation bin
    edges: torch.Tensor  # [bins + 1] float64 bin edges (fixed by the first batch)
    top: KeepBest  # top-k activations
    pool: KeepBest  # uniform reservoir of firing tokens
    fvu: FVUAccumulator
    batches_done: int = 0
    passthrough: int = 0  # rows the SAE passes through (massive activations): not scored

    @classmethod
    def empty(cls, n: int, d: int, bins: int, top_k: int, reservoir: int) -> ScanState:
        return cls(
            torch.zeros(n, dtype=torch.int64),
            torch.zeros(n, dtype=torch.float64),
            torch.zeros(n),
            torch.zeros(n, bins, dtype=torch.int64),
            torch.zeros(0, dtype=torch.float64),
            KeepBest(n, top_k),
            KeepBest(n, reservoir),
            FVUAccumulator(d),
        )

    def save(self, path: Path) -> None:
        tensors = {
            "fire_counts": self.fire_counts,
            "act_sum": self.act_sum,
            "act_max": self.act_max,
            "hist": self.hist,
            "edges": self.edges,
            "fvu.sum_x": self.fvu.sum_x,
            "fvu.sum_x2": self.fvu.sum_x2,
            **self.top.state("top"),
            **self.pool.state("pool"),
        }
        meta = {
            "batches_done": self.batches_done,
            "passthrough": self.passthrough,
            "fvu.n": self.fvu.n,
            "fvu.sum_err2": self.fvu.sum_err2,
            "fvu.sum_active": self.fvu.sum_active,
        }
        atomic_save_tensors(path, tensors, {"state": json.dumps(meta)})

    def restore(self, path: Path) -> None:
        tensors, meta = _load(path)
        for name in ("fire_counts", "act_sum", "act_max", "hist", "edges"):
            setattr(self, name, tensors[name])
        self.top.restore(tensors, "top")
        self.pool.restore(tensors, "pool")
        self.fvu.sum_x, self.fvu.sum_x2 = tensors["fvu.sum_x"], tensors["fvu.sum_x2"]
        self.fvu.n, self.fvu.sum_err2, self.fvu.sum_active = (
            meta["fvu.n"],
            meta["fvu.sum_err2"],
            meta["fvu.sum_active"],
        )
        self.batches_done, self.passthrough = meta["batches_done"], meta["passthrough"]


def _histogram_edges(values: torch.Tensor, bins: int) -> torch.Tensor:
    """[bins + 1] log-spaced edges spanning the first batch's activations, with room above."""
    positive = values[values > 0].double()
    lo = float(positive.quantile(0.001)) / 4 if len(positive) else 1e-3
    hi = float(positive.max()) * 4 if len(positive) else 1.0
    return torch.logspace(
        np.log10(max(lo, 1e-8)), np.log10(max(hi, lo * 10)), bins + 1, dtype=torch.float64
    )


@torch.no_grad()
def scan_batch(state: ScanState, sae: SAE, x: torch.Tensor, first_row: int, seed: int) -> None:
    """Fold one batch of raw activations x: [b, d] (store rows first_row..) into the state."""
    n = sae.cfg.n_latents
    skipped = sae.passthrough(x)  # [b] massive activations get no code
    code = sae.encode(x)
    active = code.values > 0
    # [nnz]
    cols, values, rows = (
        code.cols[active],
        code.values[active],
        code.rows[active] + first_row,
    )
    state.fvu.update(x[~skipped], sae.decode(code)[~skipped], int(active.sum()))
    state.passthrough += int(skipped.sum())
    if len(state.edges) == 0:
        state.edges = _histogram_edges(values, state.hist.shape[1])
    state.fire_counts += torch.bincount(cols, minlength=n)
    state.act_sum.index_add_(0, cols, values.double())
    state.act_max.scatter_reduce_(0, cols, values.float(), reduce="amax")
    bins = state.hist.shape[1]
    # [nnz]
    which = (torch.searchsorted(state.edges, values.double(), right=True) - 1).clamp(0, bins - 1)
    state.hist += torch.bincount(cols * bins + which, minlength=n * bins).view(n, bins)
    state.top.update(cols, values, rows, values)
    state.pool.update(cols, row_hash(rows, cols, n, seed), rows, values)


def run_scan(
    sae: SAE,
    store: ActivationStore,
    path: Path,
    n_tokens: int,
    batch_size: int,
    bins: int,
    top_k: int,
    reservoir: int,
    seed: int,
    checkpoint_every: int,
    log,
) -> ScanState:
    """The whole scan, resumed from `path` when a checkpoint is there. `log(entry)` records
    progress."""
    state = ScanState.empty(sae.cfg.n_latents, sae.cfg.d_in, bins, top_k, reservoir)
    if path.exists():
        state.restore(path)
    n_batches = -(-n_tokens // batch_size)
    first = state.batches_done
    bar = tqdm(
        range(first, n_batches),
        desc="release: scan features",
        unit="batch",
        initial=first,
        total=n_batches,
    )
    for b in bar:
        start = b * batch_size
        rows = torch.arange(start, min(start + batch_size, n_tokens))
        scan_batch(state, sae, store.rows(rows, hooks=[sae.cfg.hook])[sae.cfg.hook], start, seed)
        state.batches_done = b + 1
        if state.batches_done % checkpoint_every == 0 or state.batches_done == n_batches:
            state.save(path)
            log({"stage": "scan", "batches": [first, state.batches_done]})
            first = state.batches_done
    return state


# ---------------------------------------------------------------------------- contexts


@dataclass
class Examples:
    """Chosen tokens and their context windows, ragged: example e owns
    flat[offsets[e]:offsets[e + 1]]."""

    feature: torch.Tensor  # [E] int64
    kind: list[str]  # [E] "top" | "quantile"
    rank: torch.Tensor  # [E] rank among the feature's top-k, or index within its band
    band: torch.Tensor  # [E] quantile band (0 = lowest), -1 for top examples
    band_min: torch.Tensor  # [E] lowest / highest sampled activation of the band (nan for top)
    band_max: torch.Tensor  # [E]
    row: torch.Tensor  # [E] store row of the chosen token
    activation: torch.Tensor  # [E] the feature's activation on it
    offsets: torch.Tensor  # [E + 1]
    window_rows: torch.Tensor  # [sum L] store rows of every window

    @property
    def focus(self) -> torch.Tensor:  # [E] index of the chosen token within its window
        return self.row - self.window_rows[self.offsets[:-1]]


def store_columns(store: ActivationStore, n_tokens: int) -> dict[str, torch.Tensor]:
    """token_ids, positions, doc_ids and the window bounds first / last, [n_tokens] int64 each.

    A window is a run of rows of one document with consecutive positions (one harvested context).
    Only the three small integer columns of the store are read (24 bytes a row), never activations.
    """
    parts: dict[str, list[torch.Tensor]] = {"token_ids": [], "positions": [], "doc_ids": []}
    for s in range(len(store.manifest.shards)):
        shard = store.shard(s)
        for key in parts:
            parts[key].append(shard[key].long())
    columns = {k: torch.cat(v)[:n_tokens] for k, v in parts.items()}
    positions, docs = columns["positions"], columns["doc_ids"]
    starts = torch.ones(n_tokens, dtype=torch.bool)
    starts[1:] = (positions[1:] != positions[:-1] + 1) | (docs[1:] != docs[:-1])
    window = torch.cumsum(starts.long(), 0) - 1  # [n_tokens] window id
    first_of = starts.nonzero().squeeze(1)  # [n_windows]
    last_of = torch.cat([first_of[1:] - 1, torch.tensor([n_tokens - 1])])
    return {**columns, "first": first_of[window], "last": last_of[window]}


def choose_examples(
    state: ScanState,
    quantiles: int,
    per_quantile: int,
    first: torch.Tensor,
    last: torch.Tensor,
    left: int,
    right: int,
) -> Examples:
    """Top-k tokens of every feature, plus per_quantile reservoir tokens from each of `quantiles`
    equal-count bands of the reservoir's activations (the feature's activation distribution)."""
    cols: dict[str, list] = {
        k: []
        for k in ("feature", "kind", "rank", "band", "band_min", "band_max", "row", "activation")
    }

    def add(
        f: int, kind: str, rank: int, band: int, lo: float, hi: float, row: int, act: float
    ) -> None:
        for key, value in zip(cols, (f, kind, rank, band, lo, hi, row, act), strict=True):
            cols[key].append(value)

    nan = float("nan")
    for f in range(state.top.n):
        for j in (state.top.rows[f] >= 0).nonzero().squeeze(1).tolist():
            add(f, "top", j, -1, nan, nan, int(state.top.rows[f, j]), float(state.top.values[f, j]))
        valid = state.pool.rows[f] >= 0
        values, order = state.pool.values[f][valid].sort()
        rows = state.pool.rows[f][valid][order]
        for band, chunk in enumerate(torch.tensor_split(torch.arange(len(values)), quantiles)):
            if len(chunk) == 0:
                continue
            picks = chunk[
                torch.linspace(0, len(chunk) - 1, min(per_quantile, len(chunk))).round().long()
            ]
            lo, hi = float(values[chunk[0]]), float(values[chunk[-1]])
            for i, p in enumerate(picks.tolist()):
                add(f, "quantile", i, band, lo, hi, int(rows[p]), float(values[p]))
    row = torch.tensor(cols["row"], dtype=torch.int64)
    lo = torch.maximum(row - left, first[row]) if len(row) else row
    hi = torch.minimum(row + right, last[row]) if len(row) else row
    lengths = hi - lo + 1  # [E]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    within = torch.arange(int(offsets[-1])) - offsets[:-1].repeat_interleave(lengths)
    return Examples(
        torch.tensor(cols["feature"], dtype=torch.int64),
        cols["kind"],
        torch.tensor(cols["rank"]),
        torch.tensor(cols["band"]),
        torch.tensor(cols["band_min"]),
        torch.tensor(cols["band_max"]),
        row,
        torch.tensor(cols["activation"]),
        offsets,
        lo.repeat_interleave(lengths) + within,
    )


@torch.no_grad()
def run_contexts(
    sae: SAE,
    store: ActivationStore,
    examples: Examples,
    path: Path,
    batch_size: int,
    checkpoint_every: int,
    log,
) -> torch.Tensor:
    """[sum L] the example's feature's activation on every token of every window.

    Only the distinct rows some window needs are encoded (each once); the wanted (row, feature)
    activations are looked up in each batch's code by binary search.
    """
    n = sae.cfg.n_latents
    feature_of = examples.feature.repeat_interleave(examples.offsets.diff())  # [sum L]
    keys = examples.window_rows * n + feature_of  # [sum L]
    wanted = torch.unique(keys)  # [K] sorted
    rows_needed = torch.unique(wanted // n)  # [R] sorted
    values = torch.zeros(len(wanted))
    first = 0
    if path.exists():
        tensors, meta = _load(path)
        values, first = tensors["values"], meta["batches_done"]
    n_batches = -(-len(rows_needed) // batch_size)
    done = first
    for b in tqdm(
        range(first, n_batches),
        desc="release: context activations",
        unit="batch",
        initial=first,
        total=n_batches,
    ):
        chunk = rows_needed[b * batch_size : (b + 1) * batch_size]  # [c] sorted store rows
        code = sae.encode(store.rows(chunk, hooks=[sae.cfg.hook])[sae.cfg.hook])
        entry_keys, order = torch.sort(chunk[code.rows] * n + code.cols)
        lo, hi = torch.searchsorted(
            wanted, torch.stack([chunk[0] * n, (chunk[-1] + 1) * n])
        ).tolist()
        at, hit = locate(entry_keys, wanted[lo:hi])
        values[lo:hi] = (
            torch.where(hit, code.values[order][at] if len(order) else 0.0, 0.0)
            .float()
            .clamp_min(0)
        )
        done = b + 1
        if done % checkpoint_every == 0 or done == n_batches:
            atomic_save_tensors(
                path, {"values": values}, {"state": json.dumps({"batches_done": done})}
            )
            log({"stage": "contexts", "batches": [first, done]})
            first = done
    return values[torch.searchsorted(wanted, keys)]
