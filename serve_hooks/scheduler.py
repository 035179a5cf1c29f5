"""Continuous batching under a token budget: decodes first, then prefill chunks, FCFS.

Each step the scheduler walks the running requests in arrival order and gives each its next
chunk (one token for a decode, up to the remaining budget for a prefill in progress); then admits
waiting requests, oldest first, matching their prompt against the prefix cache so only the
uncached tail is computed. When the block pool cannot hold a running request's next chunk, the
newest running request is preempted by recompute: its blocks are freed (cached ones stay in the
trie) and it goes back to the front of the queue. Oldest-first everywhere means no request waits
behind newer ones forever.
"""

from __future__ import annotations

import bisect
from collections import deque

from serve_hooks.block_manager import BlockManager
from serve_hooks.config import EngineConfig
from serve_hooks.prefix_cache import PrefixCache
from serve_hooks.sequence import Sequence, Status


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager, cache: PrefixCache) -> None:
        self.cfg, self.blocks, self.cache = cfg, blocks, cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The chunks of this step: [(sequence, number of tokens to compute)]."""
        budget = self.cfg.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:  # preempted below to make room for an older request
                continue
            n = min(seq.remaining, budget)
            if not self.cfg.chunked_prefill and n < seq.remaining:
                continue
            if not self._make_room(seq, n):
                continue  # seq itself was preempted
            self.blocks.append(seq, n)
            scheduled.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            matched = self.cache.match(seq)
            n = min(seq.num_tokens - len(matched) * self.cfg.block_size, budget)
            if (
                not self.cfg.chunked_prefill
                and n < seq.num_tokens - len(matched) * self.cfg.block_size
            ):
                break
            if not self.cache.can_admit(seq, matched, n):
                break
            self.waiting.popleft()
            self.cache.admit(seq, matched)
            self.blocks.append(seq, n)
            self.start(seq)  # running stays oldest first, preempted requests included
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def _make_room(self, seq: Sequence, n: int) -> bool:
        """Preempt the newest other running requests until seq's chunk fits; False if seq went."""
        while not self.blocks.can_append(seq, n):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def start(self, seq: Sequence) -> None:
        """Run a sequence that already holds its blocks (a request handed over by a prefill
        engine)."""
        seq.status = Status.RUNNING
        bisect.insort(self.running, seq, key=_age)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.free(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason


def _age(seq: Sequence) -> tuple[float, int]:
    return seq.arrival_time, seq.seq_id
