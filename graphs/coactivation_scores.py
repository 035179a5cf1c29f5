"""What co-activation counts give: `CoactivationStats`, saved as stats.safetensors + stats.json.

Over N counted tokens, c_i = tokens on which latent i fired (value > 0), c_ij = tokens on which both
i and j fired (i ≠ j):

    p_i = c_i / N        p_ij = c_ij / N
    PMI(i, j)  = log(p_ij / (p_i p_j)) = log(c_ij N / (c_i c_j))    natural log, symmetric
    NPMI(i, j) = PMI / −log p_ij, in [−1, 1]                        1 when p_ij = 1
    Jaccard    = c_ij / (c_i + c_j − c_ij)
    P(j | i)   = c_ij / c_i                                          directed

With residual counts (`--residual`), m_j = tokens on which j was missed (`graphs.residual`: silent
although the residual points at it) and the directed c^miss_ij = tokens on which i fired and j was
missed. Their lift

    residual(i → j) = c^miss_ij / c_i − m_j / N      how much more often j is missed when i fires

ranks child → parent edges of absorbed features, which rarely co-fire (`--score residual`).

Files (format_version 1):

    stats.safetensors       feature_counts [n] int64, pair_index [2, P] int32 (i < j),
                            pair_counts [P] int64; with residual counts also miss_counts [n],
                            miss_index [2, Q] int32 (i active, j missed), miss_pair_counts [Q]
    stats.json              format_version, n_tokens, n_latents, and the provenance in `meta`;
                            written last, with "complete": true, so its presence marks finished
                            stats
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file

from sae.atomic import atomic_save_tensors, atomic_write_json

FORMAT_VERSION = 1
STATS, STATS_JSON = "stats.safetensors", "stats.json"
Score = Literal["npmi", "pmi", "jaccard", "conditional", "residual"]
SCORES: tuple[str, ...] = ("npmi", "pmi", "jaccard", "conditional", "residual")


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
