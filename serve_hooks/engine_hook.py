"""`EngineHook`: the one interface through which code runs inside the engine.

The engine calls a hook at these points, and nowhere else; every method's default does nothing,
so a hook overrides only what it needs (`harvest.TrafficHarvester` reads layer outputs only;
`hook.FeatureHook` uses all of them).

    model runner   on_layer         each layer output named in `points`, once per step, over the
                                    whole flattened batch; returning a tensor replaces it (steering)
    prefix cache   page_version     which feature pages a request needs beside cached KV: a prefix
                                    match stops at the first block without them
                   block_page       a full block of the request entered the cache: the per-token
                                    data to keep beside its KV (moved with it to host and disk)
                   on_admit         a request starts (again, after preemption) on cached blocks:
                                    their pages, in block order
    engine         on_handoff       a prefill-only request is done: tensors to send with its KV
                   on_import        a request prefilled elsewhere arrives with those tensors
                   on_abort         a request was cancelled: drop its state

Attach with `engine.attach(hook)` (which checks `points`) and detach with `engine.detach(hook)`.
A hook may add names to `points` later (`FeatureHook.steer` does); check them first with
`engine.runner.check_point`.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from torch import Tensor

from serve_hooks.context import StepContext
from serve_hooks.sequence import Sequence

Page = dict[str, Tensor]  # named per-token tensors of one block's positions: [block_size, ...]


class EngineHook:
    points: AbstractSet[str] = frozenset()  # layer outputs on_layer sees (blocks.L.hook_...)

    def on_layer(self, point: str, rows: Tensor, ctx: StepContext) -> Tensor | None:
        """rows: [n_tokens, d_model], the step's flattened batch at `point`. Return a tensor of
        the same shape to replace it for the rest of the forward, None to leave it as it is."""
        return None

    def page_version(self, seq: Sequence) -> str | None:
        """The version of the pages `seq` needs beside cached KV (None: it needs none)."""
        return None

    def block_page(self, seq: Sequence, start: int, end: int) -> Page | None:
        """What to keep beside the KV of `seq`'s positions [start, end) (one full block) when
        that block enters the cache without a page of `page_version(seq)`; None keeps nothing."""
        return None

    def on_admit(self, seq: Sequence, pages: list[Page]) -> None:
        """`seq` starts on `seq.num_prefix_hit` cached tokens; `pages` holds its version's page
        of each of those blocks (empty when `page_version(seq)` is None)."""

    def on_handoff(self, seq: Sequence) -> dict[str, Tensor]:
        """`seq` was prefilled here and goes to another engine: named tensors to send along."""
        return {}

    def on_import(self, seq: Sequence, extras: dict[str, Tensor]) -> None:
        """`seq` arrives prefilled from another engine with every hook's `on_handoff` tensors."""

    def on_abort(self, seq_id: int) -> None:
        """The request was cancelled (it may have finished already, or never started)."""
