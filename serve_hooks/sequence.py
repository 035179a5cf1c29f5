"""A request in flight (`Sequence`) and how it samples (`SamplingParams`).

A sequence is its token ids (prompt, then outputs) plus how many of them already have KV in the
cache (`num_computed`). Every step computes a chunk [num_computed, num_computed + n) of them:
a prefill chunk, or — once only the last sampled token is missing — a decode step of one token.
Preemption by recompute just resets num_computed to 0: outputs so far become part of what is
re-prefilled, and sampling continues from the same per-request generator, so the tokens that
follow are the ones an unpreempted run would produce.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from enum import Enum

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: all tokens
    seed: int | None = None  # a per-request generator (reproducible sampling)
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)  # stop strings (excluded from the text)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            problems.append(f"temperature must be in [0, 100], got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            problems.append(f"seed must be in [0, 2^63), got {self.seed}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop strings must be non-empty strings")
        if problems:
            raise ValueError("; ".join(problems))


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    cache_key: str = ""  # prefix-cache namespace (e.g. a steering fingerprint): keys never mix
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    num_prefix_hit: int = 0  # prompt tokens found in the prefix cache at the last admission
    num_preemptions: int = 0
    finish_reason: str | None = None  # "stop", "length", "abort"
    generator: torch.Generator | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    prefill_only: bool = False  # P/D split: finish after the first token and hand the KV over

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        """Tokens still to compute before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED
