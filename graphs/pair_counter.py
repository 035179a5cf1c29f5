"""Which SAE latents fire on the same tokens, counted sparsely: `CoactivationCounter`.

A token with L active latents holds L(L−1)/2 pairs (496 at L = 32), ~5e8 for 1M tokens, spread over
~1e7 distinct cells of the n² matrix: too many to keep raw, too sparse to keep dense. Each batch's
pairs become int keys i·n + j (i < j), sorted and run-length counted into a sorted run, which is
merged log-structured (`_PairRuns`): every count is merged O(log batches) times and memory stays
O(distinct pairs). With residual counts, the (i active, j missed) pairs of a missed code
(`graphs.residual`) are counted the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from graphs.coactivation_scores import CoactivationStats
from sae.sae import SparseCode

PAIR_BUDGET = 1 << 24  # pair keys built at once (64-128 MB): bounds memory even for dense codes


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
