"""Co-activation statistics: which SAE latents fire on the same tokens, counted sparsely.

    coactivation_stats(cfg)   streams a store through a trained SAE, writes (or resumes) cfg.out
    CoactivationCounter       the in-memory accumulator behind it (add(code) batch by batch)
    CoactivationStats         counts + co-counts; PMI, NPMI, Jaccard, P(j | i); top-m candidates

Over N counted tokens, c_i = tokens on which latent i fired (value > 0), c_ij = tokens on which both
i and j fired (i ≠ j):

    p_i = c_i / N        p_ij = c_ij / N
    PMI(i, j)  = log(p_ij / (p_i p_j)) = log(c_ij N / (c_i c_j))    natural log, symmetric
    NPMI(i, j) = PMI / −log p_ij, in [−1, 1]                        1 when p_ij = 1
    Jaccard    = c_ij / (c_i + c_j − c_ij)
    P(j | i)   = c_ij / c_i                                          directed

With `--residual`, the same pass also counts, per token, which latents the code *missed*
(`graphs.residual`: silent although the residual points at them): m_j = tokens on which j was
missed, and the directed c^miss_ij = tokens on which i fired and j was missed. Their lift

    residual(i → j) = c^miss_ij / c_i − m_j / N      how much more often j is missed when i fires

ranks child → parent edges of absorbed features, which rarely co-fire (`--score residual`).

A token with L active latents holds L(L−1)/2 pairs (496 at L = 32), ~5e8 for 1M tokens, spread over
~1e7 distinct cells of the n² matrix: too many to keep raw, too sparse to keep dense. Each batch's
pairs become int keys i·n + j (i < j), sorted and run-length counted into a sorted run, which is
merged log-structured (see CoactivationCounter): every count is merged O(log batches) times and
memory stays O(distinct pairs). Rows the SAE passes through (massive activations, see
`SAE.passthrough`) get no code and are not counted in N, as in sae.evaluate.

Output directory (format_version 1):

    checkpoint.safetensors  while running: feature_counts + the runs; JSON state in the metadata
    stats.safetensors       feature_counts [n] int64, pair_index [2, P] int32 (i < j),
                            pair_counts [P] int64; with --residual also miss_counts [n],
                            miss_index [2, Q] int32 (i active, j missed), miss_pair_counts [Q]
    candidates.safetensors  edge_index [2, E] int64, scores [E] float32, for cfg.m / score /
                            min_count
    stats.json              format_version, n_tokens, n_latents, sae, hook, config, ...; written
                            last, with "complete": true, so its presence marks a finished run
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from graphs.residual import missed_features
from sae.atomic import atomic_save_tensors, atomic_write_json
from sae.io import SAE_FILE, load_sae
from sae.models import sha256_file
from sae.sae import SAE, SparseCode
from sae.store import MANIFEST, ActivationStore

FORMAT_VERSION = 1
CHECKPOINT, STATS, STATS_JSON, CANDIDATES = (
    "checkpoint.safetensors",
    "stats.safetensors",
    "stats.json",
    "candidates.safetensors",
)
Score = Literal["npmi", "pmi", "jaccard", "conditional", "residual"]
SCORES: tuple[str, ...] = ("npmi", "pmi", "jaccard", "conditional", "residual")
PAIR_BUDGET = 1 << 24  # pair keys built at once (64-128 MB): bounds memory even for dense codes
FREE_FIELDS = ("store", "sae", "out", "device", "checkpoint_every")  # results don't depend on them
RESIDUAL_FIELDS = ("residual", "miss_k")  # part of a run's identity only when residual is on


@dataclass
class StatsConfig:
    store: str = ""
    """Activation store directory (from `python -m sae harvest`)."""
    sae: str = ""
    """Trained SAE directory (cfg.json + sae.safetensors, e.g. a `python -m sae train`
    OUT/<hook>/)."""
    out: str = ""
    """Output directory (created, or resumed if it holds this same run)."""
    hook: str = ""
    """Hook to read from the store (default: the SAE's own hook)."""
    tokens: int = 0
    """Tokens to count, the first ones in store order after --skip-tokens (0: the rest of the
    store)."""
    skip_tokens: int = 0
    """Store rows to skip before counting (to count disjoint slices of one store)."""
    batch_size: int = 4096
    """Tokens encoded per batch."""
    m: int = 32
    """Candidate neighbours kept per feature."""
    score: Score = "npmi"
    """How candidate neighbours are ranked: npmi, pmi, jaccard, conditional (P(j | i)) or residual
    (how much more often j is missed when i fires; needs --residual)."""
    min_count: int = 5
    """Pairs that co-fire on fewer tokens are never candidates."""
    residual: bool = False
    """Also count missed features (graphs.residual) and (i active, j missed) pairs: the input of
    --score residual. Costs one more GEMM per batch and about doubles the counting."""
    miss_k: int = 16
    """With --residual: at most this many missed latents per token (those the residual points at
    most)."""
    checkpoint_every: int = 50
    """Batches between resumable checkpoints."""
    device: str = "cpu"
    """Torch device for the SAE encoder (counting runs on the CPU)."""


@dataclass(eq=False)
class CoactivationStats:
    n_latents: int
    n_tokens: int
    feature_counts: torch.Tensor  # [n_latents] int64: tokens on which each latent fired
    # [2, P] int64, i < j, unique, sorted: pairs that co-fired at least once
    pair_index: torch.Tensor
    pair_counts: torch.Tensor  # [P] int64: tokens on which both fired
    meta: dict = field(default_factory=dict)  # provenance for stats.json (sae, hook, config, ...)
    miss_counts: torch.Tensor | None = (
        None  # [n_latents] int64: tokens on which each latent was missed
    )
    miss_index: torch.Tensor | None = None  # [2, Q] int64 (i active, j missed), unique, sorted
    miss_pair_counts: torch.Tensor | None = (
        None  # [Q] int64: tokens on which i fired and j was missed
    )

    @property
    def has_residual(self) -> bool:
        return self.miss_counts is not None

    def _counts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_i, c_j, c_ij) per pair as float64: exact integers up to 2^53."""
        counts = self.feature_counts.double()
        return counts[self.pair_index[0]], counts[self.pair_index[1]], self.pair_counts.double()

    def pmi(self) -> torch.Tensor:
        """[P] float64: log(c_ij N / (c_i c_j))."""
        c_i, c_j, c_ij = self._counts()
        return torch.log(c_ij * self.n_tokens / (c_i * c_j))

    def npmi(self) -> torch.Tensor:
        """[P] float64: PMI / −log p_ij; 1 for pairs that fire on every token (−log p_ij = 0)."""
        surprise = -torch.log(self.pair_counts.double() / self.n_tokens)  # [P] ≥ 0
        return torch.where(surprise > 0, self.pmi() / surprise, torch.ones_like(surprise))

    def jaccard(self) -> torch.Tensor:
        """[P] float64: c_ij / (c_i + c_j − c_ij)."""
        c_i, c_j, c_ij = self._counts()
        return c_ij / (c_i + c_j - c_ij)

    def conditional(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Directed (src, dst, P(dst | src) = c_ij / c_src), both directions of each pair: [2P]
        each."""
        c_i, c_j, c_ij = self._counts()
        i, j = self.pair_index
        return torch.cat([i, j]), torch.cat([j, i]), torch.cat([c_ij / c_i, c_ij / c_j])

    def residual_lift(self) -> torch.Tensor:
        """[Q] float64 over miss_index: c^miss_ij / c_i − m_j / N (how much more often j is missed
        when i fires)."""
        if not self.has_residual:
            raise ValueError(
                "these stats hold no missed-feature counts; recompute them with --residual"
            )
        i, j = self.miss_index
        return (
            self.miss_pair_counts.double() / self.feature_counts[i].double()
            - self.miss_counts[j].double() / self.n_tokens
        )

    def directed_scores(self, score: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(src, dst, value) for both directions of each pair under `score`: [2P] each (for
        residual: each (i active, j missed) pair once, [Q])."""
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
        if score == "conditional":
            return self.conditional()
        if score == "residual":  # already directed: (i active, j missed)
            # first: it names the fix when the stats have no miss counts
            lift = self.residual_lift()
            return self.miss_index[0], self.miss_index[1], lift
        value = {"npmi": self.npmi, "pmi": self.pmi, "jaccard": self.jaccard}[score]()
        i, j = self.pair_index
        return torch.cat([i, j]), torch.cat([j, i]), torch.cat([value, value])

    def candidates(
        self, m: int = 32, score: str = "npmi", min_count: int = 5
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each feature's top-m neighbours by `score` among pairs with c_ij ≥ min_count and PMI > 0
        (for residual: targets missed on ≥ min_count of the source's tokens, with positive lift).

        Returns edge_index [2, E] int64 (row 0 source i, row 1 target j), sorted by source and
        then by descending score (ties: smaller target first), and scores [E] float32.
        """
        if m < 1 or min_count < 1:
            raise ValueError(
                f"m and min_count must be at least 1 (got m={m}, min_count={min_count})"
            )
        # (i active, j missed) pairs seen ≥ min_count times, with positive lift
        if score == "residual":
            src, dst, value = self.directed_scores(score)
            keep = (self.miss_pair_counts >= min_count) & (value > 0)
            src, dst, value = src[keep], dst[keep], value[keep]
        else:
            # [P]: most pairs are rare, so filter them first
            frequent = self.pair_counts >= min_count
            kept = CoactivationStats(
                self.n_latents,
                self.n_tokens,
                self.feature_counts,
                self.pair_index[:, frequent],
                self.pair_counts[frequent],
            )
            positive = kept.pmi() > 0
            kept.pair_index, kept.pair_counts = (
                kept.pair_index[:, positive],
                kept.pair_counts[positive],
            )
            src, dst, value = kept.directed_scores(score)  # [2P'] each
        order = torch.from_numpy(np.lexsort((dst.numpy(), -value.numpy(), src.numpy())))
        src, dst, value = src[order], dst[order], value[order]
        per_source = torch.bincount(src, minlength=self.n_latents)  # [n]
        first = torch.cumsum(per_source, 0) - per_source  # [n] where each source's edges start
        top = torch.arange(len(src)) - first[src] < m  # rank within the source's block
        return torch.stack([src[top], dst[top]]), value[top].float()

    def save(self, directory: str | Path) -> Path:
        """stats.safetensors, then stats.json (last: it marks the directory complete)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "feature_counts": self.feature_counts,
            "pair_index": self.pair_index.int(),  # ids < 2^31
            "pair_counts": self.pair_counts,
        }
        if self.has_residual:
            tensors |= {
                "miss_counts": self.miss_counts,
                "miss_index": self.miss_index.int(),
                "miss_pair_counts": self.miss_pair_counts,
            }
        atomic_save_tensors(directory / STATS, tensors)
        info = {
            "format_version": FORMAT_VERSION,
            "n_tokens": self.n_tokens,
            "n_latents": self.n_latents,
            "n_pairs": int(self.pair_counts.numel()),
            **self.meta,
            "complete": True,
        }
        atomic_write_json(directory / STATS_JSON, info)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> CoactivationStats:
        directory = Path(directory)
        if not (directory / STATS_JSON).exists() or not (directory / STATS).exists():
            raise FileNotFoundError(
                f"{directory} holds no finished co-activation stats ({STATS_JSON}, "
                f"{STATS}); run coactivation_stats with --out {directory}"
            )
        info = json.loads((directory / STATS_JSON).read_text())
        if info.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{directory / STATS_JSON} has format_version {info.get('format_version')}, "
                f"this greylens reads {FORMAT_VERSION}; recompute the stats"
            )
        tensors = load_file(directory / STATS)
        meta = {
            k: v
            for k, v in info.items()
            if k not in ("format_version", "n_tokens", "n_latents", "n_pairs", "complete")
        }
        residual = (
            (tensors["miss_counts"], tensors["miss_index"].long(), tensors["miss_pair_counts"])
            if "miss_counts" in tensors
            else (None, None, None)
        )
        return cls(
            info["n_latents"],
            info["n_tokens"],
            tensors["feature_counts"],
            tensors["pair_index"].long(),
            tensors["pair_counts"],
            meta,
            *residual,
        )


# ---------------------------------------------------------------------------- counting


def _fired_entries(code: SparseCode, n_latents: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) [nnz] of latents that fired (value > 0), sorted by row then latent, no repeats.

    Counting runs in numpy, single-threaded: these are many small ops, which torch's thread pool
    slows down on a small shared machine.
    """
    fired = (code.values > 0).cpu().numpy()
    flat = (
        code.rows.cpu().numpy()[fired].astype(np.int64) * n_latents + code.cols.cpu().numpy()[fired]
    )
    flat.sort()
    flat = flat[np.concatenate([[True], flat[1:] != flat[:-1]])] if len(flat) else flat  # [nnz]
    return flat // n_latents, flat % n_latents


def _pair_keys(
    rows: np.ndarray, cols: np.ndarray, n_rows: int, n_latents: int, budget: int = PAIR_BUDGET
) -> Iterator[np.ndarray]:
    """Yield keys i·n + j (i < j) of every pair co-firing on a row, ≤ `budget` per chunk of rows.

    rows, cols: [nnz] sorted by (row, col), as from `_fired_entries`. Entry e of a row pairs with
    the entries after it in the row, so it owns `later[e]` consecutive output slots; slot s of
    entry e holds partner e + 1 + (s − first_slot[e]). No padding to the densest row.
    """
    key_dtype = np.int32 if n_latents * n_latents < 2**31 else np.int64  # int32 halves the sort
    per_row = np.bincount(rows, minlength=n_rows)  # [N] active latents per row
    row_start = np.cumsum(per_row) - per_row  # [N] first entry of each row
    for lo, hi in _row_chunks(per_row * (per_row - 1) // 2, budget):
        e_lo, e_hi = int(row_start[lo]), int(row_start[hi - 1] + per_row[hi - 1])
        local_rows, local_cols = rows[e_lo:e_hi], cols[e_lo:e_hi].astype(key_dtype)  # [e]
        later = per_row[local_rows] - 1 - (np.arange(e_lo, e_hi) - row_start[local_rows])  # [e]
        total = int(later.sum())
        if total:
            first_slot = np.cumsum(later) - later  # [e]
            jump = np.repeat(first_slot - np.arange(len(later)) - 1, later)  # [total]
            yield np.repeat(local_cols * n_latents, later) + local_cols[np.arange(total) - jump]


def _row_chunks(pairs_per_row: np.ndarray, budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive row ranges [lo, hi) holding at most `budget` pairs each (always at least one
    row)."""
    pairs_done = np.cumsum(pairs_per_row)  # [N] pairs up to each row, inclusive
    lo = 0
    while lo < len(pairs_per_row):
        before = int(pairs_done[lo - 1]) if lo else 0
        hi = max(lo + 1, int(np.searchsorted(pairs_done, before + budget, side="right")))
        yield lo, hi
        lo = hi


def _merge(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Union of two sorted runs (keys unique within each), adding the counts of shared keys."""
    (a_keys, a_counts), (b_keys, b_counts) = (a, b) if len(a[0]) >= len(b[0]) else (b, a)
    if len(b_keys) == 0:
        return a_keys, a_counts
    # [|b|] where b's keys sit in a (a is the longer, so not empty)
    at = np.searchsorted(a_keys, b_keys)
    shared = a_keys[np.minimum(at, len(a_keys) - 1)] == b_keys  # [|b|]
    a_counts[at[shared]] += b_counts[shared]  # in place: runs own their arrays
    new = ~shared
    return np.insert(a_keys, at[new], b_keys[new]), np.insert(a_counts, at[new], b_counts[new])


def _fold(runs: list[tuple[np.ndarray, np.ndarray]], ratio: float) -> None:
    """Merge the last run into the one before while that one is at most `ratio` times as long."""
    while len(runs) > 1 and len(runs[-2][0]) <= ratio * len(runs[-1][0]):
        last = runs.pop()
        runs.append(_merge(runs.pop(), last))


def _cross_keys(
    src: tuple[np.ndarray, np.ndarray],
    dst: tuple[np.ndarray, np.ndarray],
    n_rows: int,
    n_latents: int,
    budget: int = PAIR_BUDGET,
) -> Iterator[np.ndarray]:
    """Yield keys i·n + j of every (src entry i, dst entry j) pair of the same row, ≤ `budget` per
    chunk.

    src, dst: (rows, cols) [nnz] each, sorted by row. Each src entry owns per_dst[row]
    consecutive output slots, slot s pairing it with dst entry dst_start[row] + s.
    """
    (src_rows, src_cols), (dst_rows, dst_cols) = src, dst
    key_dtype = np.int32 if n_latents * n_latents < 2**31 else np.int64
    # [N]
    per_src, per_dst = (
        np.bincount(src_rows, minlength=n_rows),
        np.bincount(dst_rows, minlength=n_rows),
    )
    src_start, dst_start = np.cumsum(per_src) - per_src, np.cumsum(per_dst) - per_dst  # [N]
    dst_cols = dst_cols.astype(key_dtype)
    for lo, hi in _row_chunks(per_src * per_dst, budget):
        e_lo, e_hi = int(src_start[lo]), int(src_start[hi - 1] + per_src[hi - 1])
        rows, cols = src_rows[e_lo:e_hi], src_cols[e_lo:e_hi].astype(key_dtype)  # [e]
        slots = per_dst[rows]  # [e]
        total = int(slots.sum())
        if total:
            within = np.arange(total) - np.repeat(np.cumsum(slots) - slots, slots)  # [total]
            yield (
                np.repeat(cols * n_latents, slots)
                + dst_cols[np.repeat(dst_start[rows], slots) + within]
            )


class _PairRuns:
    """Sparse counts of int pair keys, added chunk by chunk: sorted runs, merged log-structured.

    Each chunk's sorted run is appended, and the last run is merged into the one before it while
    that one is at most twice as long, so run lengths shrink geometrically (O(log batches) runs)
    and merging stays amortised. The key space is cut into `n_shards` ranges, each with its own
    runs: merging slices of ~1/n_shards of the pairs keeps the binary searches in cache; the shards
    concatenate in order.
    """

    def __init__(self, n_keys: int, n_shards: int = 64) -> None:
        self.edges = np.linspace(0, n_keys, n_shards + 1).astype(np.int64)  # [S + 1] key ranges
        # runs, longest first
        self.shards: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n_shards)]

    def add(self, keys: np.ndarray) -> None:
        """Count each key once per occurrence (sorts `keys` in place)."""
        keys.sort()
        # first of each key
        starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
        self.push(keys[starts], np.diff(np.append(starts, len(keys))).astype(np.int64))

    def push(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Add a sorted run of unique keys, split by shard (slices copied: they must not pin the
        run)."""
        cuts = np.searchsorted(keys, self.edges)  # [S + 1]
        for shard, lo, hi in zip(self.shards, cuts[:-1], cuts[1:], strict=True):
            if hi > lo:
                shard.append((keys[lo:hi].copy(), counts[lo:hi].copy()))
                _fold(shard, ratio=2)

    def merged(self) -> tuple[np.ndarray, np.ndarray]:
        """Every shard folded to one run, concatenated: (keys [P] sorted, counts [P] int64)."""
        for shard in self.shards:
            _fold(shard, ratio=math.inf)
        runs = [shard[0] for shard in self.shards if shard]
        if not runs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate([k for k, _ in runs]), np.concatenate([c for _, c in runs])

    def reset(self, keys: np.ndarray, counts: np.ndarray) -> None:
        self.shards = [[] for _ in self.shards]
        self.push(keys, counts)

    def entries(self) -> int:
        return sum(len(k) for shard in self.shards for k, _ in shard)


class CoactivationCounter:
    """Feature counts and sparse co-counts of sparse codes, added batch by batch (checkpointable).

    With `residual`, also the missed-feature counts and the (i active, j missed) co-counts of the
    missed codes passed to `add` (`graphs.residual.missed_features`).
    """

    def __init__(self, n_latents: int, n_shards: int = 64, residual: bool = False) -> None:
        self.n_latents, self.n_tokens = n_latents, 0
        self.feature_counts = torch.zeros(n_latents, dtype=torch.int64)  # [n]
        self.pairs = _PairRuns(n_latents * n_latents, n_shards)  # keys i·n + j, i < j
        self.miss_counts = torch.zeros(n_latents, dtype=torch.int64) if residual else None  # [n]
        # keys i·n + j: i on, j missed
        self.misses = _PairRuns(n_latents * n_latents, n_shards) if residual else None

    def add(
        self,
        code: SparseCode,
        n_uncounted: int = 0,
        missed: SparseCode | None = None,
        budget: int = PAIR_BUDGET,
    ) -> None:
        """Count one batch; `n_uncounted` of its rows (passthrough) are left out of N."""
        if (missed is None) != (self.misses is None):
            raise ValueError(
                "pass the batch's missed code exactly when the counter was built with residual=True"
            )
        rows, cols = _fired_entries(code, self.n_latents)
        self.feature_counts += torch.from_numpy(np.bincount(cols, minlength=self.n_latents))
        for keys in _pair_keys(rows, cols, code.n_rows, self.n_latents, budget):
            self.pairs.add(keys)
        if missed is not None:
            missed_rows, missed_cols = _fired_entries(missed, self.n_latents)
            self.miss_counts += torch.from_numpy(np.bincount(missed_cols, minlength=self.n_latents))
            for keys in _cross_keys(
                (rows, cols), (missed_rows, missed_cols), code.n_rows, self.n_latents, budget
            ):
                self.misses.add(keys)
        self.n_tokens += code.n_rows - n_uncounted

    def entries(self) -> int:
        """Counts held in runs (progress display)."""
        return self.pairs.entries() + (self.misses.entries() if self.misses else 0)

    def stats(self, meta: dict | None = None) -> CoactivationStats:
        n = self.n_latents

        def index_and_counts(runs: _PairRuns) -> tuple[torch.Tensor, torch.Tensor]:
            keys, counts = runs.merged()
            keys = torch.from_numpy(keys).long()  # [P]
            return torch.stack([keys // n, keys % n]), torch.from_numpy(counts)  # [2, P], [P]

        residual = (None, None, None)
        if self.misses is not None:
            residual = (self.miss_counts.clone(), *index_and_counts(self.misses))
        return CoactivationStats(
            n,
            self.n_tokens,
            self.feature_counts.clone(),
            *index_and_counts(self.pairs),
            meta or {},
            *residual,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Counts so far; compacts the runs (the result does not depend on how they were merged)."""
        keys, counts = self.pairs.merged()
        state = {
            "feature_counts": self.feature_counts,
            "pair_keys": torch.from_numpy(keys),
            "pair_counts": torch.from_numpy(counts),
        }
        if self.misses is not None:
            keys, counts = self.misses.merged()
            state |= {
                "miss_counts": self.miss_counts,
                "miss_keys": torch.from_numpy(keys),
                "miss_pair_counts": torch.from_numpy(counts),
            }
        return state

    def load_state_dict(self, tensors: dict[str, torch.Tensor], n_tokens: int) -> None:
        if ("miss_counts" in tensors) != (self.misses is not None):
            raise ValueError("the checkpoint's residual setting differs from this counter's")
        self.feature_counts, self.n_tokens = tensors["feature_counts"].clone(), n_tokens
        self.pairs.reset(tensors["pair_keys"].numpy(), tensors["pair_counts"].numpy())
        if self.misses is not None:
            self.miss_counts = tensors["miss_counts"].clone()
            self.misses.reset(tensors["miss_keys"].numpy(), tensors["miss_pair_counts"].numpy())


# ---------------------------------------------------------------------------- the job


def coactivation_stats(cfg: StatsConfig) -> CoactivationStats:
    """Count (or resume counting) cfg.tokens of the store; a killed run re-run with the same cfg
    ends identical."""
    store, sae, hook = _check_inputs(cfg)
    out = Path(cfg.out)
    identity = _identity(cfg, store, hook)
    if (out / STATS_JSON).exists():
        _check_same_run(
            out, json.loads((out / STATS_JSON).read_text()).get("identity", {}), identity
        )
        print(f"[greylens] {out} already holds these co-activation stats")
        return CoactivationStats.load(out)
    counter = CoactivationCounter(sae.cfg.n_latents, residual=cfg.residual)
    state = {"batches_done": 0, "n_passthrough": 0}
    if (out / CHECKPOINT).exists():
        state = _load_checkpoint(out, identity, counter)
    out.mkdir(parents=True, exist_ok=True)
    n_tokens = cfg.tokens or len(store) - cfg.skip_tokens
    n_batches = math.ceil(n_tokens / cfg.batch_size)
    with tqdm(
        total=n_batches, initial=state["batches_done"], unit="batch", desc=f"coactivation {hook}"
    ) as bar:
        for batch in range(state["batches_done"], n_batches):
            # [B]
            rows = cfg.skip_tokens + torch.arange(
                batch * cfg.batch_size, min((batch + 1) * cfg.batch_size, n_tokens)
            )
            code, n_passthrough, missed = _encode(
                sae,
                store.rows(rows, hooks=[hook])[hook].to(cfg.device),
                cfg.miss_k if cfg.residual else 0,
            )
            counter.add(code, n_passthrough, missed)
            state["batches_done"], state["n_passthrough"] = (
                batch + 1,
                state["n_passthrough"] + n_passthrough,
            )
            bar.update(1)
            bar.set_postfix(run_entries=counter.entries())
            if (batch + 1) % cfg.checkpoint_every == 0 and batch + 1 < n_batches:
                _save_checkpoint(out, counter, state, identity)
    meta = {
        "sae": str(Path(cfg.sae).resolve()),
        "hook": hook,
        "store": str(Path(cfg.store).resolve()),
        "config": asdict(cfg),
        "identity": identity,
        "n_passthrough": state["n_passthrough"],
    }
    stats = counter.stats(meta)
    edge_index, scores = stats.candidates(cfg.m, cfg.score, cfg.min_count)
    atomic_save_tensors(out / CANDIDATES, {"edge_index": edge_index, "scores": scores})
    stats.save(out)  # stats.json goes last: from here on the run counts as complete
    (out / CHECKPOINT).unlink(missing_ok=True)
    return stats


def _encode(
    sae: SAE, x: torch.Tensor, miss_k: int = 0
) -> tuple[SparseCode, int, SparseCode | None]:
    """The SAE code of x [B, d_model], how many of its rows were passed through uncoded, and (with
    miss_k > 0) the features the code missed (graphs.residual; passthrough rows miss nothing)."""
    with torch.inference_mode():
        code = sae.encode(x)
        missed = None
        if miss_k > 0:
            x_n = x.to(sae.W_dec.dtype) * sae.cfg.input_scale
            missed = missed_features(x_n, code, sae.W_dec, sae.b_dec, miss_k)
        return code, int(sae.passthrough(x).sum()), missed


def _check_inputs(cfg: StatsConfig) -> tuple[ActivationStore, SAE, str]:
    """Every refusal happens here, before anything is read or written."""
    if not (cfg.store and cfg.sae and cfg.out):
        raise ValueError(
            "pass --store DIR (an activation store), --sae DIR (a trained SAE) and --out DIR"
        )
    for name in ("batch_size", "m", "min_count", "checkpoint_every", "miss_k"):
        if getattr(cfg, name) < 1:
            raise ValueError(
                f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}"
            )
    if cfg.tokens < 0:
        raise ValueError(f"--tokens must be 0 (the whole store) or positive, got {cfg.tokens}")
    if cfg.score not in SCORES:
        raise ValueError(f"unknown --score {cfg.score!r}; choose one of {', '.join(SCORES)}")
    if cfg.score == "residual" and not cfg.residual:
        raise ValueError("--score residual ranks by missed features: pass --residual to count them")
    if not (Path(cfg.store) / MANIFEST).exists():
        raise ValueError(
            f"--store {cfg.store} is not an activation store (no {MANIFEST}); "
            "point it at a directory made by `python -m sae harvest`"
        )
    if not (Path(cfg.sae) / SAE_FILE).exists():
        raise ValueError(
            f"--sae {cfg.sae} holds no {SAE_FILE}; point it at an SAE directory "
            "(cfg.json + sae.safetensors) such as `python -m sae train`'s OUT/<hook>/"
        )
    store, sae = ActivationStore(cfg.store), load_sae(cfg.sae, cfg.device).eval()
    hook = cfg.hook or sae.cfg.hook
    if not hook:
        raise ValueError(
            f"{cfg.sae}/cfg.json names no hook; pass --hook (the store holds "
            f"{', '.join(store.hooks)})"
        )
    if hook not in store.hooks:
        raise ValueError(
            f"the store has no hook {hook!r} (it holds {', '.join(store.hooks)}); pass --hook "
            f"with one of those, or use a store harvested at {hook}"
        )
    _check_sae_matches_store(sae, store)
    if len(store) == 0:
        raise ValueError(f"the store {cfg.store} holds no tokens yet; finish its harvest first")
    if cfg.skip_tokens < 0 or cfg.skip_tokens >= len(store):
        raise ValueError(
            f"--skip-tokens must be in 0..{len(store) - 1} (the store holds {len(store)}), got "
            f"{cfg.skip_tokens}"
        )
    if cfg.tokens + cfg.skip_tokens > len(store):
        raise ValueError(
            f"--tokens {cfg.tokens} is more than the store holds ({len(store)}); pass "
            f"--tokens {len(store)} or less (0: the whole store), or harvest more"
        )
    return store, sae, hook


def _check_sae_matches_store(sae: SAE, store: ActivationStore) -> None:
    m = store.manifest
    if sae.cfg.d_in != m.d_model:
        raise ValueError(
            f"the SAE reads d_in {sae.cfg.d_in} but the store holds d_model {m.d_model}; "
            f"use a store harvested from the SAE's model ({sae.cfg.model or 'unknown'})"
        )
    # an imported SAE may not know its model's weights: then at least the model names must agree
    same = (
        sae.cfg.weights_sha256 == m.weights_sha256
        if sae.cfg.weights_sha256
        else sae.cfg.model in ("", m.model)
    )
    if not same:
        raise ValueError(
            f"the SAE was trained on activations of {sae.cfg.model} (weights sha256 "
            f"{sae.cfg.weights_sha256[:12] or '?'}…) but the store was harvested from "
            f"{m.model} ({m.weights_sha256[:12]}…); use a store of the SAE's model, "
            "or an SAE trained on this store"
        )


def _identity(cfg: StatsConfig, store: ActivationStore, hook: str) -> dict:
    """Everything the results depend on: settings, the SAE's weights and the store's contents."""
    # stats made before --residual still match
    skip = FREE_FIELDS + (() if cfg.residual else RESIDUAL_FIELDS)
    config = {k: v for k, v in asdict(cfg).items() if k not in skip}
    config["hook"] = hook  # "" and the SAE's own hook are the same run
    shards = hashlib.sha256("".join(s.sha256 for s in store.manifest.shards).encode()).hexdigest()
    return {
        "config": config,
        "sae_sha256": sha256_file(Path(cfg.sae) / SAE_FILE),
        "store": {**store.manifest.identity(), "shards_sha256": shards},
    }


def _check_same_run(out: Path, saved: dict, current: dict) -> None:
    theirs, ours = saved.get("config", {}), current["config"]
    diffs = [
        f"{k}: {out} has {theirs.get(k)!r}, this run {ours.get(k)!r}"
        for k in sorted(ours.keys() | theirs.keys())
        if theirs.get(k) != ours.get(k)
    ]
    diffs += [f"{k} differs" for k in ("sae_sha256", "store") if saved.get(k) != current[k]]
    if diffs:
        raise ValueError(
            f"{out} holds a co-activation run with other inputs or settings "
            f"({'; '.join(diffs)}); re-run with the original ones to resume it, or pick a "
            "new --out (other candidates from finished stats: "
            "CoactivationStats.load(out).candidates(m, score, min_count))"
        )


def _save_checkpoint(out: Path, counter: CoactivationCounter, state: dict, identity: dict) -> None:
    meta = {
        "format_version": FORMAT_VERSION,
        **state,
        "n_tokens": counter.n_tokens,
        "identity": identity,
    }
    atomic_save_tensors(out / CHECKPOINT, counter.state_dict(), {"greylens": json.dumps(meta)})


def _load_checkpoint(out: Path, identity: dict, counter: CoactivationCounter) -> dict:
    with safe_open(out / CHECKPOINT, framework="pt") as f:
        meta = json.loads(f.metadata()["greylens"])
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{out / CHECKPOINT} has format_version {meta.get('format_version')}, expected "
                f"{FORMAT_VERSION}; delete it to start over"
            )
        _check_same_run(out, meta["identity"], identity)
        counter.load_state_dict({k: f.get_tensor(k) for k in f.keys()}, meta["n_tokens"])
    return {"batches_done": meta["batches_done"], "n_passthrough": meta["n_passthrough"]}
