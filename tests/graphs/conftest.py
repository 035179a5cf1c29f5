"""A small trained pipeline on the tiny model, shared by the graph tests (built once, ~10 s)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

from graphs.coactivation import StatsConfig, coactivation_stats
from graphs.crosslayer import TransitionConfig, fit_transition
from graphs.train import GraphTrainConfig, train_graph
from sae.store import ActivationStore
from sae.train import TrainConfig, train

SOURCE_HOOK, TARGET_HOOK = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


class TinyGraph(NamedTuple):
    store: ActivationStore
    sae_dirs: Path  # <hook>/ under it
    stats: Path
    graph: Path
    transition: Path


def graph_train_config(
    store: ActivationStore, stats: Path, out: Path, **overrides
) -> GraphTrainConfig:
    fields = dict(
        store=str(store.directory),
        stats=str(stats),
        out=str(out),
        m=8,
        tokens=256 * 10,
        batch_size=256,
        checkpoint_every=2,
        log_every=2,
        wandb="disabled",
    )
    fields.update(overrides)
    return GraphTrainConfig(**fields)


@pytest.fixture(scope="session")
def tiny_graph(tiny_store: ActivationStore, tmp_path_factory: pytest.TempPathFactory) -> TinyGraph:
    root = tmp_path_factory.mktemp("graph")
    train(
        TrainConfig(
            store=str(tiny_store.directory),
            out=str(root / "sae"),
            arch="topk",
            k=8,
            expansion=4,
            tokens=256 * 10,
            batch_size=256,
            lr=3e-3,
            wandb="disabled",
        )
    )
    coactivation_stats(
        StatsConfig(
            store=str(tiny_store.directory),
            sae=str(root / "sae" / SOURCE_HOOK),
            out=str(root / "stats"),
            batch_size=512,
            m=8,
            min_count=2,
        )
    )
    train_graph(graph_train_config(tiny_store, root / "stats", root / "graph", min_count=2))
    fit_transition(
        TransitionConfig(
            store=str(tiny_store.directory),
            source=str(root / "graph"),
            target=str(root / "sae" / TARGET_HOOK),
            out=str(root / "transition"),
            m=8,
            min_count=2,
            batch_size=512,
        )
    )
    return TinyGraph(tiny_store, root / "sae", root / "stats", root / "graph", root / "transition")


def release_config(tiny_graph: TinyGraph, out: Path, **overrides):
    """Export settings for the tiny pipeline: every input kind, small batches, a short CE run."""
    from graphs.release.export import ExportConfig

    fields = dict(
        sae=str(tiny_graph.sae_dirs / SOURCE_HOOK),
        graph=str(tiny_graph.graph),
        store=str(tiny_graph.store.directory),
        stats=str(tiny_graph.stats),
        transition=str(tiny_graph.transition),
        out=str(out),
        batch_size=256,
        ce_tokens=256,
    )
    fields.update(overrides)
    return ExportConfig(**fields)


@pytest.fixture(scope="session")
def tiny_release(tiny_graph: TinyGraph, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished release of the tiny pipeline (dashboard included), built once."""
    from graphs.release.export import export_release

    return export_release(release_config(tiny_graph, tmp_path_factory.mktemp("release") / "r"))
