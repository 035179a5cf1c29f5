"""load_release (graphs.release.load): the round trip of the card, the tables and every side
file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graphs.release import load_release
from sae.io import load_sae
from tests.graphs.conftest import SOURCE_HOOK, TinyGraph

CARD_FIELDS = (
    "model",
    "weights_sha256",
    "hook",
    "width",
    "architecture",
    "tokens",
    "fvu",
    "l0",
    "ce_loss_recovered",
    "dead_fraction",
    "corpus",
    "license",
)


def test_round_trip_card_and_side_files(tiny_release: Path, tiny_graph: TinyGraph) -> None:
    release = load_release(tiny_release)
    assert set(release.data) == {"features", "examples", "edges"}
    assert {k: len(v) for k, v in release.data.items()} == release.meta["counts"]
    assert all(release.card[k] is not None for k in CARD_FIELDS)
    assert release.card["width"] == 256 and release.card["hook"] == SOURCE_HOOK
    assert (
        "config_name: features" in release.readme
        and "| fvu |" in release.readme
        and "heuristic" in release.readme
    )
    # SAELens layout round trip
    original, exported = (
        load_sae(tiny_graph.sae_dirs / SOURCE_HOOK),
        release.sae(),
    )
    x = tiny_graph.store.rows(torch.arange(64), hooks=[SOURCE_HOOK])[SOURCE_HOOK]
    assert torch.allclose(original(x), exported(x), atol=1e-4)
    limit = original.cfg.max_input_norm  # the passthrough limit survives, and the card shows it
    assert limit > 0 and exported.cfg.max_input_norm == release.card["max_input_norm"] == limit
    row = release.data["features"][5]
    neuronpedia = release.neuronpedia(5)
    assert neuronpedia["index"] == "5" and neuronpedia["maxActApprox"] == pytest.approx(
        row["max_activation"]
    )
    assert neuronpedia["pos_str"] == row["top_logit_tokens"] and len(
        neuronpedia["activations"]
    ) == len(release.examples_of(5))
    circuits = release.circuits()
    assert len(circuits) == 2
    for graph in circuits.values():
        ids = {n["node_id"] for n in graph["nodes"]}
        assert graph["links"] and all(
            link["source"] in ids and link["target"] in ids for link in graph["links"]
        )
        assert {n["feature_type"] for n in graph["nodes"]} >= {"embedding", "sae feature", "logit"}
    assert release.dashboard.exists()
