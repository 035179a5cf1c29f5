"""Graph-autoencoder training speed vs TopK SAE training, same run, same store (prints JSON).

Both trainers run for the same number of steps at the same width and batch on the same store:
`sae.train` (TopK from scratch) and `graphs.train` (the graph autoencoder from the stats' SAE and
its co-activation candidates, default settings). Speed is each trainer's own logged tokens/s over
its training loop (initialisation excluded): over the whole run ("run") and over its last quarter
("steady": by then most gates have closed, and a step touches far fewer edges than at the start).
The two are run alternately, `--rounds` times, and the ratios of the medians are reported: the
machine is shared, so only ratios within a run count. Both use the same optimizer and windows: the
graph trainer's fused Adam with its warm-up and decay fractions, and its AuxK dead window
(GraphTrainConfig.dead_tokens), so the TopK side is not the SAE trainer's default (schedule-free
AdamW, a dead window of a fifth of the run) and the ratio measures the graph's cost alone.

    python scripts/bench_graph.py --store out/l15-train-1m --stats out/graph/stats-l15 [--steps 48]
    python scripts/bench_graph.py --store out/l15-train-1m --parents out/graph/parents20  # (c)

With --parents DIR (`python -m graphs parents`) the graph autoencoder trains as in the quality
table's (c): DIR's SAE, stats and edges, gates held open (graphs.parents.HELD_OPEN).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from graphs.coactivation import CoactivationStats
from graphs.parents import HELD_OPEN
from graphs.train import GraphTrainConfig, train_graph
from sae.io import load_sae
from sae.train import TrainConfig, train


def _speeds(out: Path, batch_size: int) -> tuple[float, float, dict]:
    """(whole-run tok/s, last-window tok/s, last row) from a run's metrics.jsonl (cumulative
    tok_s)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["step"] * batch_size / r["tok_s"] for r in rows]  # seconds since the loop started
    window = (rows[-1]["step"] - rows[-2]["step"]) * batch_size / (elapsed[-1] - elapsed[-2])
    return rows[-1]["tok_s"], window, rows[-1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", required=True)
    parser.add_argument("--stats", help="co-activation stats dir (`python -m graphs stats`)")
    parser.add_argument(
        "--parents", help="a `python -m graphs parents` dir: train with its stats, edges and recipe"
    )
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if bool(args.stats) == bool(args.parents):
        parser.error("pass exactly one of --stats DIR and --parents DIR")
    return args


def one_round(args: argparse.Namespace, sae, recipe: dict, root: Path) -> dict[str, Path]:
    """Both trainers, the same steps, width and batch on the same store: their run directories."""
    tokens, log_every = args.steps * args.batch_size, max(1, args.steps // 4)
    common = dict(
        store=args.store,
        tokens=tokens,
        batch_size=args.batch_size,
        log_every=log_every,
        checkpoint_every=10**9,
        wandb="disabled",
    )
    graph_cfg = GraphTrainConfig(stats=args.stats, out=str(root / "graph"), **common, **recipe)
    # the graph trainer's optimizer schedule and dead window, given to the TopK run too
    matched = dict(
        warmup_frac=graph_cfg.warmup_frac,
        decay_frac=graph_cfg.decay_frac,
        dead_tokens=graph_cfg.dead_tokens,
    )
    train(
        TrainConfig(
            out=str(root / "topk"),
            hooks=sae.cfg.hook,
            arch="topk",
            k=sae.cfg.k,
            expansion=sae.cfg.n_latents // sae.cfg.d_in,
            optimizer="adam",
            **matched,
            **common,
        )
    )
    train_graph(graph_cfg)
    return {"topk": root / "topk", "graph": root / "graph"}


def main() -> None:
    args = parse_args()
    recipe = {}
    if args.parents:
        args.stats = str(Path(args.parents) / "stats")
        recipe = {**HELD_OPEN, "edges": str(Path(args.parents) / "edges.safetensors")}
    sae = load_sae(CoactivationStats.load(args.stats).meta["sae"])
    speeds: dict[str, list[float]] = {
        "topk": [],
        "graph": [],
        "topk_steady": [],
        "graph_steady": [],
    }
    last_graph_row: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, out in one_round(args, sae, recipe, Path(tmp) / f"round{r}").items():
                run, steady, row = _speeds(out, args.batch_size)
                speeds[name].append(run)
                speeds[f"{name}_steady"].append(steady)
            last_graph_row = row
    median = {name: statistics.median(values) for name, values in speeds.items()}
    report = {
        "store": args.store,
        "recipe": "parents (held open)" if args.parents else "default",
        "hook": sae.cfg.hook,
        "n_latents": sae.cfg.n_latents,
        "k": sae.cfg.k,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "rounds": args.rounds,
        "optimizer": "fused Adam (both)",
        "dead_tokens": GraphTrainConfig.dead_tokens,
        "topk_tok_s": median["topk"],
        "graph_tok_s": median["graph"],
        "ratio": median["graph"] / median["topk"],
        "ratio_steady": median["graph_steady"] / median["topk_steady"],
        "goal": 0.7,
        "graph_last_row": {
            k: last_graph_row[k] for k in ("l0", "l0_evidence", "mean_degree", "implied_per_token")
        },
        "all_tok_s": speeds,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
