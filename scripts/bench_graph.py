"""Graph-autoencoder training speed vs TopK SAE training, same run, same store (prints JSON).

Both trainers run for the same number of steps at the same width and batch on the same store:
`sae.train` (TopK from scratch) and `graphs.train` (the graph autoencoder from the stats' SAE and
its co-activation candidates, default settings). Speed is each trainer's own logged tokens/s over
its training loop (initialisation excluded). The two are run alternately, `--rounds` times, and
the ratio of the medians is reported: the machine is shared, so only ratios within a run count.

    python scripts/bench_graph.py --store out/l15-train-1m --stats out/graph/stats-l15 [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from graphs.coactivation import CoactivationStats
from graphs.train import GraphTrainConfig, train_graph
from sae.io import load_sae
from sae.train import TrainConfig, train


def _last_row(out: Path) -> dict:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--stats", required=True, help="co-activation stats dir (`python -m graphs stats`)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sae = load_sae(CoactivationStats.load(args.stats).meta["sae"])
    tokens = args.steps * args.batch_size
    speeds: dict[str, list[float]] = {"topk": [], "graph": []}
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            topk_out, graph_out = Path(tmp) / f"topk{r}", Path(tmp) / f"graph{r}"
            train(TrainConfig(store=args.store, out=str(topk_out), hooks=sae.cfg.hook, arch="topk", k=sae.cfg.k,
                              expansion=sae.cfg.n_latents // sae.cfg.d_in, tokens=tokens, batch_size=args.batch_size,
                              log_every=args.steps, checkpoint_every=10**9, wandb="disabled"))  # fmt: skip
            train_graph(GraphTrainConfig(store=args.store, stats=args.stats, out=str(graph_out), tokens=tokens,
                                         batch_size=args.batch_size, log_every=args.steps, checkpoint_every=10**9,
                                         wandb="disabled"))  # fmt: skip
            rows["topk"], rows["graph"] = _last_row(topk_out), _last_row(graph_out)
            speeds["topk"].append(rows["topk"]["tok_s"])
            speeds["graph"].append(rows["graph"]["tok_s"])
    topk, graph = statistics.median(speeds["topk"]), statistics.median(speeds["graph"])
    print(json.dumps({
        "store": args.store, "hook": sae.cfg.hook, "n_latents": sae.cfg.n_latents, "k": sae.cfg.k,
        "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
        "topk_tok_s": topk, "graph_tok_s": graph, "ratio": graph / topk, "goal": 0.7,
        "graph_last_row": {k: rows["graph"][k] for k in ("l0", "l0_evidence", "mean_degree", "implied_per_token")},
        "all_tok_s": speeds,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
