"""`LLM`: the engine in one call (vLLM's offline API), with features, probes and steering.

llm = LLM("smollm2-135m", saes=["out/sae/blocks.15.hook_resid_post"], max_num_batched_tokens=256)
outs = llm.generate(["Once upon a time"], SamplingParams(max_tokens=32))
outs[0].text, outs[0].token_ids, outs[0].finish_reason, outs[0].features
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path

from torch import Tensor

from probes.probe import Probe
from sae.models import LoadedModel
from serve_hooks.config import EngineConfig
from serve_hooks.engine import LLMEngine, RequestOutput
from serve_hooks.hook import FeatureHook
from serve_hooks.sequence import SamplingParams


class LLM:
    """`LLM(model, **engine settings).generate(prompts, SamplingParams)` (vLLM's offline API).

    With `saes` / `probes` a `FeatureHook` runs inside the engine and every output carries
    `.features` (per-token top-n codes per SAE hook and scores per probe, for every token the
    model read: the prompt and all generated tokens but the last) and `.features.triggers` (each
    probe's pooled score and whether it fired). With `graph` (a graph autoencoder directory,
    optionally `transition`) `.features.predictions` explains every generated token as reasoning
    paths (see serve_hooks.paths). `steering=(vector, hook)` adds a vector at a residual hook for
    that call's requests (they get their own KV namespace). `settings` are `EngineConfig` fields.
    """

    def __init__(
        self,
        model: str | LoadedModel = "smollm2-135m",
        saes: Seq[object | str | Path] = (),
        probes: Seq[Probe | str | Path] = (),
        top_n: int = 8,
        graph: str | Path | None = None,
        transition: str | Path | None = None,
        **settings: object,
    ) -> None:
        name = model if isinstance(model, str) else model.name
        self.engine = LLMEngine(
            EngineConfig(model=name, **settings), None if isinstance(model, str) else model
        )
        self.hook: FeatureHook | None = None
        if saes or probes or graph:
            self.hook = FeatureHook(
                self.engine, saes, probes, top_n, graph=graph, transition=transition
            )

    def generate(
        self,
        prompts: str | list[str | list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        steering: tuple[Tensor, str] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion; outputs in prompt order, with `.features` when hooked."""
        if steering is not None and self.hook is None:
            self.hook = FeatureHook(self.engine)
        key = self.hook.steer(*steering) if steering is not None else ""
        outs = self.engine.generate(
            prompts if isinstance(prompts, list) else [prompts], params, cache_key=key
        )
        if self.hook is not None:
            for out in outs:
                out.features = self.hook.release(out.seq_id)
                if out.features is not None:
                    ids = out.prompt_token_ids + out.token_ids
                    out.features.triggers = self.hook.pooled(out.features, ids)
                    out.features.predictions = self.hook.explain(out.features, ids)
        return outs
