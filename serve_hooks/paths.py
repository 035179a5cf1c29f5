"""Reasoning paths for generated tokens, computed inside the engine (no extra forward, no backward).

A generated token y was predicted from the last row of the step that sampled it (position p,
y = token p + 1). For that row the recorder keeps what `graphs.explain.Explainer` needs:

    source   the graph autoencoder's code at its hook (layer l), post-propagation
    target   the layer l + Δ SAE's code (only with a transition graph)
    rms      the RMS of the residual entering the final norm (linearises the norm, as offline)

Once y is known (the next step, or when the request finishes) `explain` turns those into the
top paths source → target → y and the direct effects source → y, exactly what
`Explainer.explain` reports offline for the same text and position.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from graphs.coders import AsSAE
from graphs.explain import load_explainer
from graphs.model import GraphCode
from sae.sae import SparseCode
from serve_hooks.context import StepContext
from serve_hooks.engine import LLMEngine


class Prediction(NamedTuple):
    """What one prediction row left behind: codes as (cols, values) pairs and the final RMS."""

    source: tuple[Tensor, Tensor]  # ([a] latent ids, [a] activations) at layer l
    target: tuple[Tensor, Tensor] | None  # the same at layer l + Δ
    rms: float


class PathRecorder:
    def __init__(
        self, engine: LLMEngine, graph: str | Path, transition: str | Path | None = None
    ) -> None:
        self.explainer = load_explainer(
            engine.model, str(graph), str(transition) if transition else None
        )
        self.encoder = AsSAE(self.explainer.source)  # the SAE the hook reports at the source hook
        self.source_hook = self.explainer.source_sae.cfg.hook
        self.target_hook = (
            self.explainer.target.cfg.hook if self.explainer.target is not None else None
        )
        self.final_hook = f"blocks.{engine.model.fast.config.num_hidden_layers - 1}.hook_resid_post"
        self.readout = engine.model.family.readout(engine.model.fast)
        self.extra_hooks = sorted(
            {self.final_hook} | ({self.target_hook} if self.target_hook else set())
        )
        self.pending: dict[int, dict[int, dict]] = {}  # seq_id -> position -> parts of a Prediction

    def source_code(self, x: Tensor) -> GraphCode:
        return self.explainer.source_code(x)

    def reset(self, seq_id: int) -> None:
        """A (re)admitted request starts over: rows computed again overwrite, never append."""
        self.pending[seq_id] = {}

    def _prediction_rows(
        self, ctx: StepContext, chosen: list[int], offsets: list[int] | None
    ) -> Iterator[tuple[int, int, int]]:
        """(seq_id, position, row in the given rows) of each chosen request whose chunk yields
        logits."""
        cu, logit = ctx.cu_seqlens_q.tolist(), set(ctx.logit_seqs)
        for j, i in enumerate(chosen):
            if i in logit:
                n = cu[i + 1] - cu[i]
                row = (offsets[j] if offsets is not None else cu[i]) + n - 1
                yield ctx.seqs[i].seq_id, ctx.starts[i] + n - 1, row

    def keep_sources(
        self, code: SparseCode, ctx: StepContext, chosen: list[int], offsets: list[int]
    ) -> None:
        for seq_id, position, row in self._prediction_rows(ctx, chosen, offsets):
            on = code.rows == row
            self.pending.setdefault(seq_id, {})[position] = {
                "source": (code.cols[on], code.values[on])
            }

    def keep_extra(self, hook: str, rows: Tensor, ctx: StepContext, chosen: list[int]) -> None:
        """Target codes and the final RMS at the prediction rows (rows: the whole flattened
        batch)."""
        for seq_id, position, row in self._prediction_rows(ctx, chosen, None):
            parts = self.pending.setdefault(seq_id, {}).setdefault(position, {})
            x = rows[row : row + 1].float()  # [1, d_model]
            if hook == self.target_hook:
                code = self.explainer.target.encode(x)
                parts["target"] = (code.cols, code.values)
            if hook == self.final_hook:
                parts["rms"] = float(self.readout.scale(x)[0])

    def release(self, seq_id: int) -> dict[int, dict]:
        return self.pending.pop(seq_id, {})

    def export(self, seq_id: int) -> dict[str, Tensor]:
        """A request's pending predictions as named tensors (they travel in a P/D handoff)."""
        out = {}
        for position, parts in self.release(seq_id).items():
            for part in ("source", "target"):
                if part in parts:
                    cols, values = parts[part]
                    out[f"paths.{position}.{part}.cols"] = cols
                    out[f"paths.{position}.{part}.values"] = values
            if "rms" in parts:
                out[f"paths.{position}.rms"] = torch.tensor([parts["rms"]])
        return out

    def adopt(self, seq_id: int, tensors: dict[str, Tensor]) -> None:
        """The inverse of `export`, on the engine that continues the request."""
        pending = self.pending.setdefault(seq_id, {})
        for name, tensor in tensors.items():
            if not name.startswith("paths."):
                continue
            _, position, part, *rest = name.split(".")
            parts = pending.setdefault(int(position), {})
            if part == "rms":
                parts["rms"] = float(tensor[0])
            elif rest == ["cols"]:
                parts[part] = (tensor, tensors[f"paths.{position}.{part}.values"])

    def explain(self, pending: dict[int, dict], token_ids: list[int], top: int = 5) -> list[dict]:
        """One entry per prediction whose token is known: position, token id, paths, direct effects.
        token_ids: the request's tokens so far (prompt + generated)."""
        positions = sorted(p for p in pending if p + 1 < len(token_ids) and "rms" in pending[p])
        if not positions:
            return []
        source = _stack([pending[p]["source"] for p in positions])
        target = _stack([pending[p]["target"] for p in positions]) if self.target_hook else None
        predicted = torch.tensor([token_ids[p + 1] for p in positions])
        rms = torch.tensor([pending[p]["rms"] for p in positions])
        found = self.explainer.predictions(source, target, predicted, rms, top)
        return [
            {"position": p, "token_id": token_ids[p + 1], **f}
            for p, f in zip(positions, found, strict=True)
        ]


def _stack(parts: list[tuple[Tensor, Tensor]]) -> SparseCode:
    """Per-row (cols, values) pairs -> one row-sorted SparseCode with a row per pair."""
    rows = torch.cat(
        [torch.full((len(cols),), i, dtype=torch.long) for i, (cols, _) in enumerate(parts)]
    )
    return SparseCode(
        torch.cat([v for _, v in parts]), torch.cat([c for c, _ in parts]), rows, len(parts)
    )
