"""Faithfulness of reasoning paths (graphs.eval.faithfulness), on the tiny model."""

from __future__ import annotations

from graphs.eval.faithfulness import attribution_correlation, edge_interventions
from graphs.explain import load_explainer
from sae.models import LoadedModel
from tests.graphs.conftest import TinyGraph
from tests.graphs.test_explain import TEXTS


def test_edges_confirmed_by_ablation_beat_the_null_and_track_gradients(
    tiny: LoadedModel, tiny_graph: TinyGraph
) -> None:
    explainer = load_explainer(tiny, str(tiny_graph.graph), str(tiny_graph.transition))
    result = edge_interventions(explainer, TEXTS, paths_per_token=2)
    assert result["edges_tested"] > 10 and result["null_tested"] > 0
    assert result["edge_confirmed_fraction"] > result["null_confirmed_fraction"]
    correlation = attribution_correlation(explainer, TEXTS)
    assert correlation["pairs"] > 20 and correlation["attribution_pearson"] > 0.5
