"""A release of a lone SAE (no --graph): no learned edges or explained prompts, said so in its card,
dataset card and dashboard, and it loads like any other release."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from graphs.__main__ import main
from graphs.release import load_release
from graphs.release.load import NO_GRAPH
from tests.graphs.conftest import SOURCE_HOOK, TinyGraph

LINK = re.compile(r'(?:src|href)="([^"#]*)(?:#[^"]*)?"')


@pytest.fixture(scope="module")
def lone_release(tiny_graph: TinyGraph, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SAE released through the CLI with neither graph, stats nor transition."""
    out = tmp_path_factory.mktemp("lone") / "r"
    args = ["export", "--sae", str(tiny_graph.sae_dirs / SOURCE_HOOK)]
    args += ["--store", str(tiny_graph.store.directory), "--out", str(out)]
    assert main([*args, "--batch-size", "256", "--ce-tokens", "256"]) == 0
    return out


def test_lone_sae_release_loads_and_says_it_has_no_graph(lone_release: Path) -> None:
    release = load_release(lone_release)
    assert not release.has_graph and release.meta["graph"] is False
    assert release.card["feature_graph"] == NO_GRAPH and release.card["graph_edges"] == 0
    assert f"Feature graph: {NO_GRAPH}" in release.readme and "circuits/" not in release.readme
    assert len(release.data["features"]) == 256 and len(release.data["edges"]) == 0
    assert release.data["edges"].features["kind"].dtype == "string"  # typed, though empty
    assert not {"graph_out", "graph_in"} & set(release.data["features"].column_names)
    assert release.circuits() == {} and not (lone_release / "circuits").exists()
    assert release.neuronpedia(3)["index"] == "3" and len(release.examples_of(3)) > 0
    assert release.sae().cfg.n_latents == 256
    assert not (lone_release / "training" / "graph_metrics.jsonl").exists()


def test_lone_sae_dashboard_has_no_graph_pages(lone_release: Path) -> None:
    site = lone_release / "dashboard"
    assert (site / "index.html").exists() and not (site / "graph.html").exists()
    index = (site / "index.html").read_text()
    assert 'id="no-graph"' in index and "Explained prompts" not in index
    feature = (site / "features" / "3.html").read_text()
    assert "none in this release" in feature
    for page in [site / "index.html", *sorted((site / "features").glob("*.html"))[:20]]:
        for target in LINK.findall(page.read_text()):
            assert not target or (page.parent / target).exists(), f"{page} links to {target}"


def test_a_graph_release_says_it_has_one(tiny_release: Path) -> None:
    release = load_release(tiny_release)
    assert release.has_graph and release.card["feature_graph"] == "graph autoencoder"
    assert json.loads((tiny_release / "release.json").read_text())["graph"] is True
