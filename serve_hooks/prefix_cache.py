"""Prefix cache: a token trie over full KV blocks, with host and disk tiers behind the device pool.

Every full block a sequence computes becomes a node of a token trie (one trie per cache key, so
namespaces such as steering fingerprints never share KV): a node's key is its block's tokens and
its parent is the block before it, so a walk from the root along a prompt's blocks is a
longest-prefix match. A node's KV lives in one tier:

    device  a block of the pool (shared by every sequence using it; `BlockManager` counts them)
    host    a slot of host memory        (when the pool evicted it and host_blocks > 0)
    disk    a file under disk_dir        (when host memory evicted it; dropped after disk_ttl_s)

The cache keeps every device block it holds (`BlockManager.keep`); one no sequence uses is idle
and stays until a new block is needed. Then the least recently used goes (deepest first on ties,
so a prefix outlives its extensions) — spilled to the next tier if there is one, else dropped
with its subtree. A prefix hit on a spilled node restores its bytes into a fresh block instead of
recomputing them. Policy is here; `KVCache` moves the bytes.

Feature pages: a node also keeps per-token data of hooks beside its KV (`pages`: version ->
named tensors), which moves with the node between tiers (on disk, inside the block's file). The
engine's `EngineHook`s say which version a request needs (`page_version`: a match stops at the
first block without it, so the request recomputes rather than missing data), fill a page when a
block enters the cache (`block_page`) and get the pages of the blocks a request starts on
(`on_admit`).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field

from torch import Tensor

from serve_hooks.block_manager import BlockManager
from serve_hooks.engine_hook import EngineHook
from serve_hooks.kv_cache import KVCache
from serve_hooks.sequence import Sequence

DEVICE, HOST, DISK, GONE, ROOT = "device", "host", "disk", "gone", "root"


@dataclass(eq=False)
class PrefixNode:
    tokens: tuple[int, ...]
    parent: PrefixNode | None
    depth: int
    tier: str = DEVICE
    block: int = -1  # device tier
    host_slot: int = -1  # host tier
    disk_name: str = ""  # disk tier
    saved_at: float = 0.0  # wall time the disk file was written (for the TTL)
    stamp: int = 0  # last use on the logical clock
    children: dict[tuple[int, ...], PrefixNode] = field(default_factory=dict)
    # Per-token data kept beside the KV (hook feature pages): version -> named tensors. On the disk
    # tier the tensors live in the block's file and the dict keeps only the versions (values None).
    pages: dict[str, dict[str, Tensor] | None] = field(default_factory=dict)

    def subtree(self) -> list[PrefixNode]:
        nodes, stack = [], [self]
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children.values())
        return nodes


class PrefixCache:
    def __init__(
        self,
        blocks: BlockManager,
        enabled: bool = True,
        kv: KVCache | None = None,
        host_blocks: int = 0,
        disk_blocks: int = 0,
        disk_ttl_s: float = 24 * 3600.0,
        hooks: list[EngineHook] | None = None,
    ) -> None:
        self.blocks, self.block_size, self.enabled, self.kv = blocks, blocks.block_size, enabled, kv
        blocks.evictor = self  # the pool asks us for an idle block when its free list is empty
        # The trie node a kept device block holds, per block.
        self.owner: list[PrefixNode | None] = [None] * blocks.num_blocks
        self.roots: dict[str, PrefixNode] = {}
        # seq_id -> (its blocks already in the trie, the last of them): commit resumes there.
        self.paths: dict[int, tuple[int, PrefixNode]] = {}
        self.host_capacity = host_blocks if kv is not None else 0
        self.host_free = list(range(self.host_capacity))
        self.disk_capacity = disk_blocks if kv is not None and kv.disk_dir is not None else 0
        self.disk_ttl_s = disk_ttl_s
        self.lru = {DEVICE: [], HOST: [], DISK: []}  # heaps of (stamp, -depth, tiebreak, node)
        self.n_disk = 0
        self.clock = itertools.count(1)
        self.tiebreak = itertools.count()
        self.stats: Counter[str] = Counter()
        self.hooks = hooks if hooks is not None else []  # the engine's: they keep feature pages

    # ------------------------------------------------------------------ lookup

    def match(self, seq: Sequence) -> list[PrefixNode]:
        """Trie nodes of the longest cached prefix of full blocks, leaving at least one token to
        compute."""
        if not self.enabled:
            return []
        bs = self.block_size
        node, found, tokens = self.roots.get(seq.cache_key), [], seq.token_ids
        versions = [v for hook in self.hooks if (v := hook.page_version(seq)) is not None]
        for i in range((seq.num_tokens - 1) // bs):
            if node is None:
                break
            node = node.children.get(tuple(tokens[i * bs : (i + 1) * bs]))
            if node is not None and node.tier == DISK and self._expired(node):
                self._drop(node)  # its subtree goes with it
                node = None
            if node is not None and any(v not in node.pages for v in versions):
                break  # the KV is cached but not what a hook needs beside it: recompute from here
            if node is not None:
                found.append(node)
        return found

    def can_admit(self, seq: Sequence, matched: list[PrefixNode], n_new: int) -> bool:
        on_device = [m for m in matched if m.tier == DEVICE]
        # Idle hits leave the available set when the sequence starts using them.
        idle_hits = sum(1 for m in on_device if self.blocks.ref[m.block] == 0)
        need = self.blocks.blocks_for(len(matched) * self.block_size + n_new) - len(on_device)
        return need <= self.blocks.num_available - idle_hits

    # ------------------------------------------------------------------ a sequence's life

    def admit(self, seq: Sequence, matched: list[PrefixNode]) -> None:
        """Give a waiting sequence the cached prefix blocks (restoring spilled ones)."""
        assert not seq.block_table, "admit() needs a sequence without blocks"
        for node in matched:  # a fresh stamp voids their LRU entries: restores cannot evict them
            node.stamp = next(self.clock)
        for node in matched:  # pin device hits first: restoring the others must not evict them
            if node.tier == DEVICE:
                self.blocks.share(node.block)
                self.stats["hit_device"] += 1
        for node in matched:
            if node.tier != DEVICE:
                self._restore(node)
            node.stamp = next(self.clock)
            seq.block_table.append(node.block)
        seq.num_computed = seq.num_prefix_hit = len(matched) * self.block_size
        if matched:
            self.paths[seq.seq_id] = (len(matched), matched[-1])
        self.stats["prefix_hit_tokens"] += seq.num_prefix_hit
        for hook in self.hooks:
            version = hook.page_version(seq)
            hook.on_admit(seq, [] if version is None else [node.pages[version] for node in matched])

    def commit(self, seq: Sequence) -> None:
        """Enter the sequence's newly computed full blocks into the trie (after a step)."""
        if not self.enabled:
            return
        done, node = self.paths.get(seq.seq_id, (0, None))
        if node is None:
            node = self.roots.setdefault(seq.cache_key, PrefixNode((), None, 0, tier=ROOT))
        bs, tokens = self.block_size, seq.token_ids
        for i in range(done, seq.num_computed // bs):
            key = tuple(tokens[i * bs : (i + 1) * bs])
            block, child = seq.block_table[i], node.children.get(key)
            if child is None:
                child = PrefixNode(key, node, node.depth + 1, block=block)
                node.children[key] = child
                self._hold(child, block)
            elif child.tier != DEVICE:  # we recomputed a spilled block: ours becomes the copy
                self._release_spilled(child)
                child.tier = DEVICE
                self._hold(child, block)
            # A duplicate (child on device already) leaves our block private.
            child.stamp = next(self.clock)
            self._add_pages(seq, i, child)
            node = child
            done = i + 1
        self.paths[seq.seq_id] = (done, node)

    def _add_pages(self, seq: Sequence, index: int, node: PrefixNode) -> None:
        """Hooks' pages for block `index` of seq, unless the node has that version already."""
        for hook in self.hooks:
            version = hook.page_version(seq)
            if version is None or version in node.pages:
                continue
            page = hook.block_page(seq, index * self.block_size, (index + 1) * self.block_size)
            if page is not None:
                node.pages[version] = page

    def free(self, seq: Sequence) -> None:
        """Release a finished or preempted sequence's blocks (kept ones stay until evicted)."""
        stamp = next(self.clock)
        for block in self.blocks.free(seq):
            node = self.owner[block]
            node.stamp = stamp
            self._push(DEVICE, node)
        self.paths.pop(seq.seq_id, None)

    # ------------------------------------------------------------------ eviction and tiers

    def evict(self) -> None:
        """Give the least recently used idle block back to the pool: its node spills to host
        memory when there is a slot (which may push an older host node to disk), else drops."""
        node = self._pop_lru(DEVICE)
        if node is None:
            raise RuntimeError("the block pool counts idle blocks the prefix cache does not hold")
        block = node.block
        self.owner[block], node.block = None, -1
        self.blocks.let_go(block)  # first on the free list: the caller takes this one
        self.stats["evicted"] += 1
        slot = self._host_slot() if self.host_capacity else None
        if slot is not None:
            self.kv.device_to_host(block, slot)
            node.tier, node.host_slot = HOST, slot
            self._push(HOST, node)
            self.stats["spilled_host"] += 1
        else:
            node.tier = GONE
            self._drop(node)

    def _hold(self, node: PrefixNode, block: int) -> None:
        node.block = block
        self.owner[block] = node
        self.blocks.keep(block)

    def _expired(self, node: PrefixNode) -> bool:
        return time.time() - node.saved_at > self.disk_ttl_s

    def _push(self, tier: str, node: PrefixNode) -> None:
        heapq.heappush(self.lru[tier], (node.stamp, -node.depth, next(self.tiebreak), node))

    def _pop_lru(self, tier: str) -> PrefixNode | None:
        heap = self.lru[tier]
        while heap:
            stamp, _, _, node = heapq.heappop(heap)
            if node.tier != tier or node.stamp != stamp:
                continue  # stale entry: the node was used, moved or dropped since
            if tier == DEVICE and self.blocks.ref[node.block] != 0:
                continue
            return node
        return None

    def _host_slot(self) -> int | None:
        """A free host slot, moving the least recently used host block to disk (or dropping it)."""
        if self.host_free:
            return self.host_free.pop()
        node = self._pop_lru(HOST)
        if node is None:  # every host block is being restored right now
            return None
        slot = node.host_slot
        if self.disk_capacity:
            self._to_disk(node)
        else:
            node.tier, node.host_slot = GONE, -1
            self._drop(node)
        return slot

    def _to_disk(self, node: PrefixNode) -> None:
        """Write a host node's KV and feature pages to one file; past capacity the oldest go."""
        name = f"{id(self):x}-{next(self.tiebreak)}"
        extras = {
            f"{version}/{key}": t for version, page in node.pages.items() for key, t in page.items()
        }
        self.kv.host_to_disk(node.host_slot, name, extras)
        node.pages = dict.fromkeys(node.pages)  # the tensors are in the file now
        node.tier, node.host_slot, node.disk_name, node.saved_at = DISK, -1, name, time.time()
        self.n_disk += 1
        self._push(DISK, node)
        self.stats["spilled_disk"] += 1
        while self.n_disk > self.disk_capacity and (victim := self._pop_lru(DISK)) is not None:
            self._drop(victim)

    def _restore(self, node: PrefixNode) -> None:
        block = self.blocks.take()
        if node.tier == HOST:
            self.kv.host_to_device(node.host_slot, block)
            self.stats["restored_host"] += 1
        else:
            extras = self.kv.disk_to_device(node.disk_name, block)
            for version in node.pages:
                prefix = f"{version}/"
                node.pages[version] = {
                    k.removeprefix(prefix): t for k, t in extras.items() if k.startswith(prefix)
                }
            self.stats["restored_disk"] += 1
        self._release_spilled(node)
        node.tier = DEVICE
        self._hold(node, block)

    def _release_spilled(self, node: PrefixNode) -> None:
        if node.tier == HOST:
            self.host_free.append(node.host_slot)
            node.host_slot = -1
        elif node.tier == DISK:
            self.kv.delete(node.disk_name)
            self.n_disk -= 1
            node.disk_name = ""
            # Pages still on disk are lost with the file.
            node.pages = {version: page for version, page in node.pages.items() if page is not None}

    def _drop(self, node: PrefixNode) -> None:
        """Remove a node and its subtree from the trie (their prefixes are no longer cached)."""
        if node.parent is not None:
            node.parent.children.pop(node.tokens, None)
        for member in node.subtree():
            if member.tier == DEVICE:
                self.owner[member.block] = None
                self.blocks.let_go(member.block)
            else:
                self._release_spilled(member)
            member.tier = GONE
        self.stats["dropped"] += 1

    def check(self) -> None:
        """The pool's invariants, and exactly the blocks of device nodes kept (tests call this)."""
        self.blocks.check()
        for block, node in enumerate(self.owner):
            assert self.blocks.kept[block] == (node is not None), f"block {block} kept wrongly"
            assert node is None or (node.tier == DEVICE and node.block == block), "owner drifted"
