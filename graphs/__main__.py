"""`python -m graphs COMMAND ...` (a stable contract: scripts call these).

stats       co-activation counts and top-m candidate edges of a trained SAE over a store
parents     label-free parent latents injected into an SAE, their stats and child -> parent edges
train       the adaptive sparse GNN autoencoder, from an SAE and its stats
transition  a cross-layer transition graph between a source (graph or SAE) and a later SAE
explain     reasoning paths for a text (JSON)
eval        reconstruction, L0 before/after propagation, graph size, CE loss recovered; with
            --letters, --planted, --transition also absorption, edge recovery, faithfulness (JSON)
export      a released feature dataset + dashboard from an SAE, its graph (optional) and a store
dashboard   rewrite the offline dashboard of a release
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from graphs.coactivation import StatsConfig, coactivation_stats
from graphs.crosslayer import TransitionConfig, fit_transition
from graphs.eval import EvalConfig, evaluate
from graphs.explain import load_explainer
from graphs.parents import ParentsConfig, build_parents, train_command
from graphs.release import load_release
from graphs.release.dashboard import write_dashboard
from graphs.release.export import ExportConfig, export_release
from graphs.train import GraphTrainConfig, train_graph
from sae.cli import add_dataclass_args, command_parser, dataclass_from_args
from sae.device import ComputeDtype
from sae.models import load_model
from sae.store import StoreError


@dataclass
class ExplainConfig:
    graph: str = ""
    """Graph autoencoder directory (`python -m graphs train`)."""
    model: str = "smollm2-135m"
    """Model the graph was trained on (a model spec: smollm2-135m, tiny-<family>, a local HF
    directory, a .gguf, or org/name)."""
    device: str = "auto"
    """Device of the model: cpu, cuda, cuda:N, or auto (cuda when there is one)."""
    dtype: ComputeDtype = "auto"
    """Compute dtype of the model: auto is float32 on CPU, bfloat16 on CUDA."""
    text: str = ""
    """Text to explain (every next-token prediction in it)."""
    transition: str = ""
    """Optional transition directory (`python -m graphs transition`) for cross-layer paths."""
    top_features: int = 8
    """Evidence / implied features listed per token."""
    top_paths: int = 5
    """Paths listed per token."""


@dataclass
class DashboardConfig:
    release: str = ""
    """Release directory (`python -m graphs export`) whose dashboard/ is rewritten."""


def run_stats(cfg: StatsConfig) -> dict:
    stats = coactivation_stats(cfg)
    return {"out": cfg.out, "n_tokens": stats.n_tokens, "n_pairs": int(stats.pair_counts.numel())}


def run_parents(cfg: ParentsConfig) -> dict:
    meta = json.loads((build_parents(cfg) / "parents.json").read_text())
    keys = ("picked", "slots", "n_edges", "parents_reached", "top_tokens")
    return {
        "out": cfg.out,
        **{k: meta[k] for k in keys},
        "train": train_command(cfg, "GRAPH_DIR"),
        "control": train_command(cfg, "CONTROL_DIR", shut=True),
    }


def run_train(cfg: GraphTrainConfig) -> dict:
    model = train_graph(cfg)
    edges, _ = model.active_edges()
    return {"out": cfg.out, "active_edges": edges.shape[1], "evidence_k": float(model.evidence_k)}


def run_transition(cfg: TransitionConfig) -> dict:
    _, meta = fit_transition(cfg)
    return {k: v for k, v in meta.items() if k != "config"}


def run_explain(cfg: ExplainConfig) -> dict:
    if not cfg.graph or not cfg.text:
        raise ValueError("pass --graph DIR and --text '...'")
    explainer = load_explainer(
        load_model(cfg.model, cfg.device, cfg.dtype), cfg.graph, cfg.transition or None
    )
    return explainer.explain(cfg.text, cfg.top_features, cfg.top_paths)


def run_export(cfg: ExportConfig) -> dict:
    out = export_release(cfg)
    dashboard = out / "dashboard" / "index.html"
    return {"release": str(out.resolve()), "dashboard": str(dashboard.resolve())}


def run_dashboard(cfg: DashboardConfig) -> dict:
    load_release(cfg.release)  # only finished releases
    return {"dashboard": str(write_dashboard(cfg.release).resolve())}


# name: (help, config dataclass, required flags, what runs it and returns the JSON to print)
COMMANDS: dict[str, tuple[str, type, tuple[str, ...], Callable[[Any], dict]]] = {
    "stats": (
        "co-activation statistics of an SAE",
        StatsConfig,
        ("store", "sae", "out"),
        run_stats,
    ),
    "parents": (
        "label-free parent latents and their edges",
        ParentsConfig,
        ("store", "sae", "out"),
        run_parents,
    ),
    "train": (
        "train the graph autoencoder",
        GraphTrainConfig,
        ("store", "stats", "out"),
        run_train,
    ),
    "transition": (
        "fit a cross-layer transition graph",
        TransitionConfig,
        ("store", "source", "target", "out"),
        run_transition,
    ),
    "explain": ("reasoning paths for a text (JSON)", ExplainConfig, ("graph", "text"), run_explain),
    "eval": ("evaluate a graph autoencoder (JSON)", EvalConfig, ("graph", "store"), evaluate),
    "export": (
        "release a feature dataset + dashboard",
        ExportConfig,
        ("sae", "store", "out"),
        run_export,
    ),
    "dashboard": ("rewrite a release's dashboard", DashboardConfig, ("release",), run_dashboard),
}


def main(argv: list[str] | None = None) -> int:
    parser, commands = command_parser("python -m graphs", __doc__)
    for name, (help_text, config, required, _) in COMMANDS.items():
        add_dataclass_args(commands.add_parser(name, help=help_text), config, required)
    args = parser.parse_args(argv)
    _, config, _, run = COMMANDS[args.command]
    try:
        print(json.dumps(run(dataclass_from_args(config, args)), indent=2))
    except (StoreError, ValueError, FileNotFoundError, MemoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
