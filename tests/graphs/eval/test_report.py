"""`python -m graphs eval` (graphs.eval.report): today's reconstruction report, plus one section per
evaluation asked for, on the tiny pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from graphs.__main__ import main
from graphs.eval import EvalConfig, evaluate
from graphs.eval.planted import DEFAULT_HOOK, PlantedHierarchy, write_store
from graphs.eval.reconstruction import graph_metrics
from graphs.io import load_graph_sae, save_graph_sae
from graphs.model import SparseGraphAutoencoder
from sae.sae import SAE, SAEConfig
from tests.graphs.conftest import TinyGraph


def _eval(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, dict | str]:
    code = main(["eval", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else err


def test_default_eval_is_the_reconstruction_report(
    tiny_graph: TinyGraph, capsys: pytest.CaptureFixture
) -> None:
    graph, store = str(tiny_graph.graph), str(tiny_graph.store.directory)
    code, report = _eval(capsys, "--graph", graph, "--store", store)
    assert code == 0
    expected = graph_metrics(load_graph_sae(graph), tiny_graph.store)
    assert report == {"graph": graph, **expected}
    assert not {"letters", "planted", "faithfulness", "ce_loss_recovered"} & set(report)


def test_letters_and_faithfulness_sections(
    tiny_graph: TinyGraph, capsys: pytest.CaptureFixture
) -> None:
    args = ["--graph", str(tiny_graph.graph), "--store", str(tiny_graph.store.directory)]
    args += ["--model", "tiny", "--letters", "--letter-tokens", "5000"]
    args += ["--transition", str(tiny_graph.transition), "--texts", "the king said to his son"]
    code, report = _eval(capsys, *args)
    assert code == 0, report
    assert "ce_loss_recovered" in report and "fvu" in report
    letters = report["letters"]
    assert {"sparse_probe", "dense_probe", "absorption", "full_absorption"} <= set(letters)
    assert 0.0 <= letters["dense_probe"] <= 1.0 and letters["letters"]
    faithfulness = report["faithfulness"]
    assert faithfulness["edges_tested"] > 0 and "attribution_pearson" in faithfulness


def test_planted_needs_a_planted_store(
    tiny_graph: TinyGraph, capsys: pytest.CaptureFixture
) -> None:
    args = ["--graph", str(tiny_graph.graph), "--store", str(tiny_graph.store.directory)]
    code, err = _eval(capsys, *args, "--planted")
    assert code == 2 and "graphs.eval.planted.write_store" in err


def test_planted_section_scores_the_graph_against_the_hierarchy(
    planted: PlantedHierarchy, tmp_path: Path
) -> None:
    """An oracle graph autoencoder: the true dictionary as decoder, the planted edges held open."""
    store = write_store(planted, tmp_path / "store", n_tokens=1024)
    sae = SAE(
        SAEConfig(
            d_in=planted.config.d_model,
            n_latents=planted.n_true,
            arch="batchtopk",
            k=6,
            hook=DEFAULT_HOOK,
            model="synthetic",
            weights_sha256=planted.weights_sha256(),
        )
    )
    with torch.no_grad():
        sae.W_dec.copy_(planted.dictionary)
        sae.W_enc.copy_(planted.dictionary)
    model = SparseGraphAutoencoder(sae, planted.edge_index)
    with torch.no_grad():
        model.log_alpha.fill_(6.0)  # every planted edge open
    save_graph_sae(model, tmp_path / "graph")
    report = evaluate(
        EvalConfig(graph=str(tmp_path / "graph"), store=str(store.directory), planted=True)
    )
    assert report["planted"]["precision"] == report["planted"]["recall"] == 1.0
    assert report["planted"]["n_learned"] == planted.edge_index.shape[1]
