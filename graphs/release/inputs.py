"""Every export input loaded and cross-checked before any work starts (errors name the fix)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphs.coactivation_scores import CoactivationStats
from graphs.crosslayer import TransitionGraph
from graphs.io import load_graph
from sae.io import load_sae
from sae.sae import SAE
from sae.spec import resolve_spec
from sae.store import ActivationStore

Edges = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # src [E], dst [E], weight [E]
POSITIVE_FIELDS = (
    "batch_size",
    "top_k",
    "quantiles",
    "per_quantile",
    "reservoir",
    "bins",
    "neighbours",
    "logits",
    "checkpoint_every",
)


@dataclass
class Inputs:
    sae: SAE
    store: ActivationStore
    n_tokens: int
    model_name: str
    graph_edges: Edges | None  # None: a lone SAE (no --graph)
    coactivation: Edges | None
    crosslayer: Edges | None
    target_hook: str
    prompts: list[str]


def check_inputs(cfg) -> Inputs:
    """Load and cross-check every input of an `ExportConfig`; raise before any work starts."""
    if not (cfg.sae and cfg.store):
        raise ValueError("pass --sae DIR and --store DIR (and --out DIR; --graph DIR optional)")
    for name in POSITIVE_FIELDS:
        if getattr(cfg, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be at least 1, got {getattr(cfg, name)}")
    sae, store = load_sae(cfg.sae), ActivationStore(cfg.store)
    hook = sae.cfg.hook
    if hook not in store.hooks:
        raise ValueError(
            f"the SAE reads {hook}; {cfg.store} holds {', '.join(store.hooks)}: harvest that hook"
        )
    if sae.cfg.weights_sha256:
        store.check_model(sae.cfg.model, sae.cfg.weights_sha256, sae.cfg.d_in)
    graph_edges = _graph_edges(cfg.graph, sae) if cfg.graph else None
    coactivation = _coactivation_edges(cfg.stats, sae, cfg.neighbours) if cfg.stats else None
    target_hook, crosslayer = (
        _transition_edges(cfg.transition, sae) if cfg.transition else ("", None)
    )
    model_name = cfg.model or sae.cfg.model
    if not model_name:
        raise ValueError("the SAE does not name its model; pass --model SPEC")
    resolve_spec(model_name)  # a bad spec fails here, before any work
    prompts = [p.strip() for p in cfg.prompts.split("|") if p.strip()]
    n_tokens = min(len(store), cfg.tokens or len(store))
    if n_tokens == 0:
        raise ValueError(f"{cfg.store} holds no tokens")
    return Inputs(
        sae,
        store,
        n_tokens,
        model_name,
        graph_edges,
        coactivation,
        crosslayer,
        target_hook,
        prompts,
    )


def _graph_edges(directory: str, sae: SAE) -> Edges:
    graph = load_graph(directory)
    n, hook = sae.cfg.n_latents, sae.cfg.hook
    if graph.num_nodes != n or graph.hook != hook:
        raise ValueError(
            f"{directory} is a graph over {graph.num_nodes} features at {graph.hook}, the SAE has "
            f"{n} at {hook}: pass the graph trained from this SAE"
        )
    return graph.edge_index[0], graph.edge_index[1], graph.edge_weight


def _coactivation_edges(directory: str, sae: SAE, neighbours: int) -> Edges:
    stats = CoactivationStats.load(directory)
    if stats.n_latents != sae.cfg.n_latents:
        raise ValueError(
            f"{directory} counts {stats.n_latents} features, the SAE has {sae.cfg.n_latents}: "
            "pass this SAE's stats"
        )
    edge_index, scores = stats.candidates(neighbours, "npmi", min_count=1)
    return edge_index[0], edge_index[1], scores


def _transition_edges(directory: str, sae: SAE) -> tuple[str, Edges]:
    """(target hook, nonzero transition edges) of a transition that starts from this SAE."""
    transition, meta = TransitionGraph.load(directory)
    n, hook = sae.cfg.n_latents, sae.cfg.hook
    if meta["source_hook"] != hook or transition.n_source != n:
        raise ValueError(
            f"{directory} starts from {meta['source_hook']} ({transition.n_source} features), "
            f"not from this SAE ({hook}, {n})"
        )
    weight = transition.weight.detach()
    keep = weight != 0
    return meta["target_hook"], (
        transition.edge_index[0, keep],
        transition.edge_index[1, keep],
        weight[keep],
    )
