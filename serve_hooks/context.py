"""What one engine step computes: which rows of the flattened batch belong to which request.

The model runner builds a `StepContext` per step; hooks receive it with every layer output
(`EngineHook.on_layer`), so they can map rows back to requests and positions without knowing
how the batch was assembled.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from serve_hooks.sequence import Sequence


@dataclass
class StepContext:
    """Rows [cu_seqlens_q[i], cu_seqlens_q[i + 1]) of the step's batch belong to seqs[i]."""

    seqs: list[Sequence]
    starts: list[int]  # first computed position of each request's chunk
    cu_seqlens_q: Tensor  # [n_seqs + 1] int64
    positions: Tensor  # [n_tokens] int64
    slots: Tensor  # [n_tokens] int64 KV slot of each row
    # Indices into seqs whose chunk ends the sequence: their last row yields logits.
    logit_seqs: list[int]
    plan: AttentionPlan | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.cu_seqlens_q[-1])


@dataclass
class AttentionPlan:
    """Where each request's keys live, worked out once per step (every layer reuses it).

    Masks are keyed by attention window (None: full attention): a model with sliding-window
    layers gets one mask set per distinct window, a model without them only the None entry."""

    # (row start, row end, context slots [ctx]) per prefill chunk
    prefills: list[tuple[int, int, Tensor]]
    # per window: one mask [q_len, ctx] bool per prefill chunk, or None for plainly causal
    prefill_masks: dict[int | None, list[Tensor | None]]
    decode_rows: Tensor | None  # [n_decode] rows that are single-token continuations
    decode_slots: Tensor | None  # [n_decode, longest] context slots (0-padded)
    decode_masks: dict[int | None, Tensor]  # per window: [n_decode, 1, 1, longest] bool
