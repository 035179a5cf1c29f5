"""Paged KV accounting: which device blocks are free, and how many sequences use each one.

A block of the device pool is in one of three states:

    free    on the free list; holds nothing anyone needs
    used    in the block tables of `ref[block]` running sequences
    idle    used by no sequence, but kept by the prefix cache: its KV may serve a later prompt,
            so it is not free until the cache evicts it

Free and idle blocks are both available for a new chunk. `take` prefers a free block; when none
is left it asks the evictor (the prefix cache) to give an idle one back. Which block that is and
where its bytes go (host memory, disk, nowhere) is the cache's policy (`serve_hooks.prefix_cache`);
this module only counts.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol

from serve_hooks.sequence import Sequence


class Evictor(Protocol):
    """What keeps idle blocks (the prefix cache): asked for one back when the free list is empty."""

    def evict(self) -> None:
        """Stop keeping one idle block (`BlockManager.let_go`), so the free list gets it."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref = [0] * num_blocks  # sequences whose block table holds the block
        self.kept = [False] * num_blocks  # the prefix cache keeps the block's KV
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.n_idle = 0  # kept blocks that no sequence uses (available once evicted)
        self.evictor: Evictor | None = None

    # ------------------------------------------------------------------ queries

    @property
    def num_available(self) -> int:
        return len(self.free_blocks) + self.n_idle

    def blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    def can_append(self, seq: Sequence, n_new: int) -> bool:
        need = self.blocks_for(seq.num_computed + n_new) - len(seq.block_table)
        return need <= self.num_available

    # ------------------------------------------------------------------ per sequence

    def append(self, seq: Sequence, n_new: int) -> None:
        """Blocks for the next n_new tokens of seq (call can_append first)."""
        for _ in range(self.blocks_for(seq.num_computed + n_new) - len(seq.block_table)):
            seq.block_table.append(self.take())

    def free(self, seq: Sequence) -> list[int]:
        """Drop a sequence's references, last block first; returns the blocks that went idle
        (kept by the cache, used by nobody now) in that order. The others are free again."""
        idle = []
        for block in reversed(seq.block_table):
            self.ref[block] -= 1
            if self.ref[block] > 0:
                continue
            if self.kept[block]:
                self.n_idle += 1
                idle.append(block)
            else:
                self.free_blocks.append(block)
        seq.block_table = []
        return idle

    # ------------------------------------------------------------------ per block

    def take(self) -> int:
        """A fresh block with one reference: a free one, else an idle one the evictor gives up."""
        if not self.free_blocks and self.n_idle and self.evictor is not None:
            self.evictor.evict()
        if not self.free_blocks:
            raise RuntimeError(
                "no free or evictable KV block (callers check can_admit / can_append first)"
            )
        block = self.free_blocks.popleft()
        self.ref[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more sequence uses a kept block (a prefix hit); an idle one is in use again."""
        if self.ref[block] == 0:
            self.n_idle -= 1
        self.ref[block] += 1

    def keep(self, block: int) -> None:
        """The prefix cache keeps this block's KV (the block is in use now)."""
        self.kept[block] = True

    def let_go(self, block: int) -> None:
        """The prefix cache stops keeping this block: idle, it is plainly free now."""
        self.kept[block] = False
        if self.ref[block] == 0:
            self.n_idle -= 1
            self.free_blocks.append(block)

    def check(self) -> None:
        """Accounting invariants (tests call this): every block is free, used or idle."""
        used = {b for b in range(self.num_blocks) if self.ref[b] > 0}
        idle = {b for b in range(self.num_blocks) if self.ref[b] == 0 and self.kept[b]}
        free = set(self.free_blocks)
        assert len(self.free_blocks) == len(free), "a block is free twice"
        assert not (free & (used | idle)), "a free block is in use"
        assert len(idle) == self.n_idle, "idle count drifted"
        assert len(free) + len(used) + len(idle) == self.num_blocks, "a block leaked"
