"""greylens.graphs.eval: the evaluations a user runs on their own SAE or feature graph.

report          EvalConfig, evaluate(cfg): `python -m graphs eval`, every evaluation as JSON
reconstruction  graph_metrics (FVU, L0 before / after propagation, graph size), without_edges,
                edge_jaccard
letters         first-letter sparse probing and feature absorption (Chanin et al. 2024)
planted         a planted child ⇒ parent hierarchy, written as an activation store
recovery        edge recovery against that hierarchy (edge_recovery, match_latents, oracles)
faithfulness    reasoning-path edges checked by ablation, paths against grad × activation

from graphs.eval import evaluate, EvalConfig
evaluate(EvalConfig(graph="out/graph", store="out/heldout", letters=True))
"""

from graphs.eval.faithfulness import attribution_correlation, edge_interventions
from graphs.eval.letters import (
    LetterTaskData,
    absorption_rate,
    chanin_absorption,
    dense_probe_accuracy,
    letter_metrics,
    letter_task_data,
    sparse_probe_accuracy,
)
from graphs.eval.planted import PlantedHierarchy, PlantedHierarchyConfig, write_store
from graphs.eval.reconstruction import edge_jaccard, graph_metrics, without_edges
from graphs.eval.recovery import edge_recovery, match_latents
from graphs.eval.report import EvalConfig, evaluate

__all__ = [
    "EvalConfig",
    "LetterTaskData",
    "PlantedHierarchy",
    "PlantedHierarchyConfig",
    "absorption_rate",
    "attribution_correlation",
    "chanin_absorption",
    "dense_probe_accuracy",
    "edge_interventions",
    "edge_jaccard",
    "edge_recovery",
    "evaluate",
    "graph_metrics",
    "letter_metrics",
    "letter_task_data",
    "match_latents",
    "sparse_probe_accuracy",
    "without_edges",
    "write_store",
]
