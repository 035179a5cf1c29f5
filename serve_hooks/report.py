"""The `greylens` object of an HTTP answer: per-token features, probe scores and reasoning paths.

A request opts in with `"greylens": {"features": top_n, "probes": [...], "paths": bool}`. The
answer carries, beside the OpenAI fields,

    "greylens": {
      "prompt":     [{"token", "id", "features": {hook: [[latent, value], ...]},
                      "probes": {name: s_t}}, ...],
      "completion": [... one per generated token; the last has "features"/"probes" null: the
                     model never read it ...],
      "paths":      [{"position", "token", "token_id", "paths": [...], "direct": [...]}, ...]
                    one per generated token (only with "paths": true and a --graph),
      "probes":     {name: {"score", "probability", "fired", "threshold"}}
                    (once the request finished)
    }

Streaming chunks carry the same object with only what is new since the previous chunk: the
positions the last step computed, the newly explained predictions, and the pooled probe summary
on the final chunk. Concatenating the chunks' lists gives the non-streamed object.
"""

from __future__ import annotations

from typing import Any

from serve_hooks.features import RequestFeatures
from serve_hooks.hook import FeatureHook


class Reporter:
    """One request's `greylens` deltas; lives on the engine thread (it reads the hook's state)."""

    def __init__(self, hook: FeatureHook, tokenizer: Any, options: Any, prompt_len: int) -> None:
        self.hook, self.tokenizer, self.options = hook, tokenizer, options
        self.prompt_len = prompt_len
        names = list(hook.probes) if options.probes is None else options.probes
        self.probes = {name: hook.probes[name] for name in names}
        self.sent = 0  # positions already reported
        self.explained = -1  # last position whose prediction was reported

    def delta(self, seq_id: int, token_ids: list[int], finished: bool) -> dict:
        """What is new since the last call; on the finished call the request's state is released."""
        state = self.hook.release(seq_id) if finished else self.hook.features(seq_id)
        computed = state.n if state is not None else 0
        # The last token (never read) closes the list.
        end = len(token_ids) if finished else computed
        out: dict[str, Any] = {"prompt": [], "completion": []}
        for position in range(self.sent, end):
            read = state is not None and position < computed
            out["prompt" if position < self.prompt_len else "completion"].append(
                self._token(token_ids[position], state if read else None, position)
            )
        self.sent = max(self.sent, end)
        if self.options.paths and state is not None:
            source = state if finished else seq_id
            found = self.hook.explain(source, token_ids, after=self.explained)
            for item in found:
                item["token"] = self.tokenizer.decode([item["token_id"]])
            if found:
                self.explained = found[-1]["position"]
            out["paths"] = found
        if finished:
            out["probes"] = self._summary(state, token_ids)
        return out

    def _token(self, token_id: int, state: RequestFeatures | None, position: int) -> dict:
        item: dict[str, Any] = {
            "token": self.tokenizer.decode([token_id]),
            "id": token_id,
            "features": None,
            "probes": None,
        }
        if state is None:
            return item
        n = self.hook.top_n if self.options.features is None else self.options.features
        if n:
            item["features"] = {}
            for hook, (ids, values) in state.codes.items():
                row_ids, row_values = ids[position, :n].tolist(), values[position, :n].tolist()
                item["features"][hook] = [
                    [i, round(v, 5)] for i, v in zip(row_ids, row_values, strict=True) if v != 0
                ]
        item["probes"] = {
            name: round(float(state.scores[name][position]), 5)
            for name in self.probes
            if name in state.scores
        }
        return item

    def _summary(self, state: RequestFeatures | None, token_ids: list[int]) -> dict:
        if state is None:
            return {}
        summary = self.hook.pooled(state, token_ids, list(self.probes))
        return {
            name: {k: round(v, 5) if isinstance(v, float) else v for k, v in item.items()}
            for name, item in summary.items()
        }
