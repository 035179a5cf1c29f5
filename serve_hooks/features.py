"""A request's per-token results inside the engine: top-n SAE codes per hook, scores per probe.

`FeatureHook` writes rows at their positions as steps compute them (a chunk computed again after
preemption overwrites, never appends), `page` cuts positions out as flat named tensors (feature
pages beside cached KV, P/D handoffs, disk files) and `fill` writes such tensors back.
"""

from __future__ import annotations

import torch
from torch import Tensor


class RequestFeatures:
    """Per-token results of one request: codes per SAE hook, scores per probe (grown on demand)."""

    def __init__(self, top_n: int) -> None:
        self.top_n, self.n = top_n, 0
        # hook -> (indices [cap, top_n], values [cap, top_n]); cap grows, n rows are written
        self.codes: dict[str, tuple[Tensor, Tensor]] = {}
        self.scores: dict[str, Tensor] = {}  # probe name -> [cap]
        # position -> what explaining its prediction needs (with a graph)
        self.path_inputs: dict[int, dict] = {}
        self.predictions: list[dict] = []  # explained predictions (FeatureHook.explain fills it)
        # probe -> pooled score, probability, fired (LLM.generate fills it)
        self.triggers: dict[str, dict] = {}

    def _room(self, length: int) -> None:
        for key, (idx, val) in self.codes.items():
            if idx.shape[0] < length:
                self.codes[key] = (_grow(idx, length), _grow(val, length))
        for key, score in self.scores.items():
            if score.shape[0] < length:
                self.scores[key] = _grow(score, length)

    def write_codes(self, hook: str, start: int, idx: Tensor, val: Tensor) -> None:
        if hook not in self.codes:
            self.codes[hook] = (
                torch.zeros(0, self.top_n, dtype=torch.long),
                torch.zeros(0, self.top_n),
            )
        self._room(start + idx.shape[0])
        self.codes[hook][0][start : start + idx.shape[0]] = idx
        self.codes[hook][1][start : start + idx.shape[0]] = val
        self.n = max(self.n, start + idx.shape[0])

    def write_scores(self, probe: str, start: int, scores: Tensor) -> None:
        if probe not in self.scores:
            self.scores[probe] = torch.zeros(0)
        self._room(start + scores.shape[0])
        self.scores[probe][start : start + scores.shape[0]] = scores
        self.n = max(self.n, start + scores.shape[0])

    def page(self, start: int, end: int) -> dict[str, Tensor]:
        """Positions [start, end) as flat named tensors: `codes.indices.<hook>`,
        `codes.values.<hook>`, `scores.<probe>` (the form feature pages, handoffs and disk files
        all use)."""
        page = {}
        for hook, (idx, val) in self.codes.items():
            page[f"codes.indices.{hook}"] = idx[start:end].clone()
            page[f"codes.values.{hook}"] = val[start:end].clone()
        for probe, scores in self.scores.items():
            page[f"scores.{probe}"] = scores[start:end].clone()
        return page

    def fill(self, start: int, page: dict[str, Tensor]) -> None:
        """Write a page (or a handoff's tensors) back at positions from `start` on."""
        for name, tensor in page.items():
            kind, _, rest = name.partition(".")
            if kind == "scores":
                self.write_scores(rest, start, tensor)
            elif rest.startswith("indices."):
                hook = rest.removeprefix("indices.")
                self.write_codes(hook, start, tensor, page[f"codes.values.{hook}"])

    def to_json(self) -> dict:
        return {
            "codes": {
                h: {"indices": i[: self.n].tolist(), "values": v[: self.n].tolist()}
                for h, (i, v) in self.codes.items()
            },
            "probes": {p: s[: self.n].tolist() for p, s in self.scores.items()},
        }


def _grow(t: Tensor, length: int) -> Tensor:
    """A zero-padded copy with room for `length` rows, at least doubled (amortised O(1) writes)."""
    out = t.new_zeros((max(length, 2 * t.shape[0]), *t.shape[1:]))
    out[: t.shape[0]] = t
    return out
