"""`python -m graphs stats|parents|train|transition|explain|eval|export|dashboard ...` (a stable contract: scripts call these).

stats       co-activation counts and top-m candidate edges of a trained SAE over a store
parents     label-free parent latents injected into an SAE, their stats and child -> parent edges
train       the adaptive sparse GNN autoencoder, from an SAE and its stats
transition  a cross-layer transition graph between a source (graph or SAE) and a later SAE
explain     reasoning paths for a text (JSON)
eval        reconstruction, L0 before/after propagation, graph size, CE loss recovered (JSON)
export      a released feature dataset + dashboard from an SAE, its graph and a store (graphs.release)
dashboard   rewrite the offline dashboard of a release
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from graphs.coactivation import StatsConfig, coactivation_stats
from graphs.crosslayer import TransitionConfig, fit_transition
from graphs.parents import ParentsConfig, build_parents, train_command
from graphs.release import ExportConfig
from graphs.train import GraphTrainConfig, train_graph
from sae.cli import add_dataclass_args, dataclass_from_args
from sae.store import StoreError


@dataclass
class ExplainConfig:
    graph: str = ""
    """Graph autoencoder directory (`python -m graphs train`)."""
    model: str = "smollm2-135m"
    """Model the graph was trained on (tiny, smollm2-135m)."""
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


@dataclass
class GraphEvalConfig:
    graph: str = ""
    """Graph autoencoder directory."""
    store: str = ""
    """Held-out activation store for reconstruction metrics."""
    model: str = ""
    """Also splice into this model for CE loss recovered (tiny, smollm2-135m)."""
    tokens: int = 8192
    """Held-out tokens to score when splicing."""
    max_store_tokens: int = 0
    """Cap on store tokens (0: all)."""


def run_explain(cfg: ExplainConfig) -> dict:
    from graphs.explain import load_explainer
    from sae.models import load_model

    if not cfg.graph or not cfg.text:
        raise ValueError("pass --graph DIR and --text '...'")
    explainer = load_explainer(load_model(cfg.model), cfg.graph, cfg.transition or None)
    return explainer.explain(cfg.text, cfg.top_features, cfg.top_paths)


def run_graph_eval(cfg: GraphEvalConfig) -> dict:
    from graphs.evaluate import graph_metrics
    from graphs.io import load_graph_sae
    from sae.evaluate import heldout_windows, splice_metrics
    from sae.models import load_model
    from sae.store import ActivationStore

    model = load_graph_sae(cfg.graph)
    result = {
        "graph": cfg.graph,
        **graph_metrics(model, ActivationStore(cfg.store), cfg.max_store_tokens or None),
    }
    if cfg.model:
        from graphs.evaluate import AsSAE

        lm = load_model(cfg.model)
        result.update(splice_metrics(lm, AsSAE(model), heldout_windows(lm, cfg.tokens)))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m graphs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_dataclass_args(
        commands.add_parser("stats", help="co-activation statistics of an SAE"),
        StatsConfig,
        ("store", "sae", "out"),
    )
    add_dataclass_args(
        commands.add_parser("parents", help="label-free parent latents and their edges"),
        ParentsConfig,
        ("store", "sae", "out"),
    )
    add_dataclass_args(
        commands.add_parser("train", help="train the graph autoencoder"),
        GraphTrainConfig,
        ("store", "stats", "out"),
    )
    add_dataclass_args(
        commands.add_parser("transition", help="fit a cross-layer transition graph"),
        TransitionConfig,
        ("store", "source", "target", "out"),
    )
    add_dataclass_args(
        commands.add_parser("explain", help="reasoning paths for a text (JSON)"),
        ExplainConfig,
        ("graph", "text"),
    )
    add_dataclass_args(
        commands.add_parser("eval", help="evaluate a graph autoencoder (JSON)"),
        GraphEvalConfig,
        ("graph", "store"),
    )
    add_dataclass_args(
        commands.add_parser("export", help="release a feature dataset + dashboard"),
        ExportConfig,
        ("sae", "graph", "store", "out"),
    )
    add_dataclass_args(
        commands.add_parser("dashboard", help="rewrite a release's dashboard"),
        DashboardConfig,
        ("release",),
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "stats":
            stats = coactivation_stats(dataclass_from_args(StatsConfig, args))
            print(
                json.dumps(
                    {
                        "out": args.out,
                        "n_tokens": stats.n_tokens,
                        "n_pairs": int(stats.pair_counts.numel()),
                    },
                    indent=2,
                )
            )
        elif args.command == "parents":
            cfg = dataclass_from_args(ParentsConfig, args)
            meta = json.loads((build_parents(cfg) / "parents.json").read_text())
            print(
                json.dumps(
                    {
                        "out": cfg.out,
                        "picked": meta["picked"],
                        "slots": meta["slots"],
                        "n_edges": meta["n_edges"],
                        "parents_reached": meta["parents_reached"],
                        "top_tokens": meta["top_tokens"],
                        "train": train_command(cfg, "GRAPH_DIR"),
                        "control": train_command(cfg, "CONTROL_DIR", shut=True),
                    },
                    indent=2,
                )
            )
        elif args.command == "train":
            cfg = dataclass_from_args(GraphTrainConfig, args)
            model = train_graph(cfg)
            edges, _ = model.active_edges()
            print(
                json.dumps(
                    {
                        "out": cfg.out,
                        "active_edges": edges.shape[1],
                        "evidence_k": float(model.evidence_k),
                    },
                    indent=2,
                )
            )
        elif args.command == "transition":
            _, meta = fit_transition(dataclass_from_args(TransitionConfig, args))
            print(json.dumps({k: v for k, v in meta.items() if k != "config"}, indent=2))
        elif args.command == "explain":
            print(json.dumps(run_explain(dataclass_from_args(ExplainConfig, args)), indent=2))
        elif args.command == "eval":
            print(json.dumps(run_graph_eval(dataclass_from_args(GraphEvalConfig, args)), indent=2))
        elif args.command == "export":
            from graphs.release import export_release

            out = export_release(dataclass_from_args(ExportConfig, args))
            print(
                json.dumps(
                    {
                        "release": str(out.resolve()),
                        "dashboard": str((out / "dashboard" / "index.html").resolve()),
                    },
                    indent=2,
                )
            )
        elif args.command == "dashboard":
            from graphs.dashboard import write_dashboard
            from graphs.release import load_release

            load_release(args.release)  # only finished releases
            print(json.dumps({"dashboard": str(write_dashboard(args.release).resolve())}, indent=2))
    except (StoreError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
