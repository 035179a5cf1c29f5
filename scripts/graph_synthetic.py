"""Planted-hierarchy evaluation: does the graph autoencoder recover known child ⇒ parent edges?

For each parent–child cosine (0: no reason to absorb; 0.5: children lean toward their parent, so a
plain SAE is tempted to absorb), on the planted hierarchy of `graphs.eval.planted` (32 parents × 3
children + 64 free features, 192 in 64 dimensions, ~4.2 active per token):

    TopK SAE (4× width, k = 6) → co-activation stats → graph autoencoder (same budget k = 6)

and scores against the planted edges, through a one-to-one decoder ↔ dictionary matching:
    (b) post-hoc: the SAE's co-activation candidates, cut to the graph autoencoder's edge count
    (c) the graph autoencoder's open edges
each next to a shuffled-target null. Prints JSON and writes out/graph_synthetic.md
(docs/graphs_eval.md quotes its table).

    python scripts/graph_synthetic.py [--tokens 100000] [--out out/synthetic]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from graphs.coactivation import CoactivationStats, StatsConfig, coactivation_stats
from graphs.eval import PlantedHierarchy, PlantedHierarchyConfig, edge_recovery, write_store
from graphs.train import GraphTrainConfig, train_graph
from sae.io import load_sae
from sae.train import TrainConfig, train

HOOK = "blocks.0.hook_resid_post"
UNIT_SCALE = {"init_weight": 0.5, "init_log_alpha": -1.0, "graph_lr": 0.02, "edge_coeff": 0.05}


def run(cos: float, tokens: int, root: Path) -> dict:
    hierarchy = PlantedHierarchy.build(PlantedHierarchyConfig(parent_child_cos=cos))
    root = root / f"cos{cos}"
    store = write_store(hierarchy, root / "store", tokens)
    if not (root / "sae" / HOOK / "cfg.json").exists():
        train(
            TrainConfig(
                store=str(store.directory),
                out=str(root / "sae"),
                arch="topk",
                k=6,
                expansion=4,
                tokens=tokens,
                batch_size=1024,
                outlier_ratio=0,
                wandb="disabled",
            )
        )
    coactivation_stats(
        StatsConfig(
            store=str(store.directory), sae=str(root / "sae" / HOOK), out=str(root / "stats")
        )
    )
    if not (root / "graph" / "graph.json").exists():
        train_graph(
            GraphTrainConfig(
                store=str(store.directory),
                stats=str(root / "stats"),
                out=str(root / "graph"),
                m=8,
                tokens=tokens,
                batch_size=1024,
                wandb="disabled",
                **UNIT_SCALE,
            )
        )
    from graphs.io import load_graph_sae

    model = load_graph_sae(root / "graph")
    edges, strengths = model.active_edges()
    graph = edge_recovery(edges, strengths, model.sae.W_dec.detach(), hierarchy)
    candidates, scores = CoactivationStats.load(root / "stats").candidates(8)
    top = torch.argsort(scores, descending=True)[: edges.shape[1]]
    posthoc = edge_recovery(
        candidates[:, top], scores[top], load_sae(root / "sae" / HOOK).W_dec.detach(), hierarchy
    )
    return {"parent_child_cos": cos, "edges": edges.shape[1], "graph": graph, "posthoc": posthoc}


def markdown(results: list[dict], tokens: int) -> str:
    lines = [
        "# Planted feature hierarchy: edge recovery",
        "",
        f"Produced by `python scripts/graph_synthetic.py --tokens {tokens}` (one seed; {tokens:,} "
        "tokens each for",
        "the TopK SAE, its co-activation stats and the graph autoencoder). Ground truth: 96 child "
        "→ parent",
        "edges. An edge counts when both endpoints match a true feature with decoder cosine ≥ 0.7",
        "(one-to-one greedy matching); precision is over the matched edges. Null: the same edges "
        "with",
        "shuffled targets (20 permutations).",
        "",
        "| parent–child cos | model | edges | precision | recall | F1 | null precision | null "
        "recall | reversed (parent → child) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, key in (
            ("(b) post-hoc, same edge count", "posthoc"),
            ("(c) graph autoencoder", "graph"),
        ):
            m = r[key]
            lines.append(
                f"| {r['parent_child_cos']} | {name} | {r['edges']} | {m['precision']:.3f} | "
                f"{m['recall']:.3f} | "
                f"{m['f1']:.3f} | {m['null_precision']:.4f} | {m['null_recall']:.4f} | "
                f"{int(m['reversed'])} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--out", default="out/synthetic")
    parser.add_argument("--doc", default="out/graph_synthetic.md")
    args = parser.parse_args()
    results = [run(cos, args.tokens, Path(args.out)) for cos in (0.0, 0.5)]
    print(json.dumps(results, indent=2))
    Path(args.doc).write_text(markdown(results, args.tokens))


if __name__ == "__main__":
    main()
