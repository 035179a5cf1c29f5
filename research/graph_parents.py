"""A ceiling for issue #4 (it uses first-letter labels, so it is not a method): does the graph
autoencoder pay once the parent latents it should imply exist? (research/LOG.md, session 8.)

1. Letters: the ten the letters metric scores on the held-out store. Per letter, u_L is the unit
   mean difference of the SAE's centred input between training-store words starting with L and
   other words.
2. Parents: the base SAE's least-used latents (training-store firing counts) become letter latents
   P_L: decoder u_L, encoder u_L scaled and biased so that P_L fires on the average L-word with the
   SAE's median active value, and not on the average other word.
3. Statistics of that SAE (`graphs stats`), then two sets of child edges i -> P_L:
     oracle        latents firing >= 20 times on training-store words, >= 50% of them starting
                   with L
     cooccurrence  P(P_L fires | i fires) > --cut on pairs seen >= 20 times, each source's best P_L
4. Graph training per seed (500k tokens): the gates-shut control and each edge set, held open
   (messages only to silent features, absorption penalty 100 detached, w0 0.5).
5. Held-out FVU, L0, implied features per token and the letters metric, with and without the edges.

Every step caches its output under --out, so a killed run resumes. Prints a markdown table and
writes <out>/parents.json.

    python research/graph_parents.py --store out/l15-train-1m --eval-store out/l15-heldout \\
        --base out/graph/topk-l15-500k/blocks.15.hook_resid_post --out out/graph-parents \\
        --seeds 1,2,3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from graphs.coactivation import StatsConfig, coactivation_stats
from graphs.coders import AsSAE
from graphs.eval import graph_metrics, letter_metrics, letter_task_data, without_edges
from graphs.eval.letters import pick_letters
from graphs.first_letter import LETTERS, first_letter_labels
from graphs.io import load_graph_sae
from graphs.parents import GATES_SHUT, HELD_OPEN, install_parents, parent_edges
from graphs.train import GraphTrainConfig, train_graph
from sae.io import load_sae, save_sae
from sae.models import load_model
from sae.store import ActivationStore

MIN_FIRES, PURITY = 20, 0.5  # oracle children: enough word firings, mostly on one letter
EDGE_SETS = ("oracle", "cooccurrence")


def letter_counts(
    sae, store: ActivationStore, labels: torch.Tensor, n_tokens: int
) -> dict[str, torch.Tensor]:
    """Per latent, firings on words of each letter (column 26: not a word); per letter, the sum and
    count of the SAE's centred inputs; the median active value (over the first 8 batches)."""
    n, d = sae.cfg.n_latents, sae.cfg.d_in
    fires = torch.zeros(n, 27, dtype=torch.int64)
    x_sum, x_count = torch.zeros(27, d, dtype=torch.float64), torch.zeros(27, dtype=torch.float64)
    values = []
    with torch.no_grad():
        for start in range(0, n_tokens, 8192):
            rows = torch.arange(start, min(start + 8192, n_tokens))
            x = store.rows(rows, hooks=[sae.cfg.hook])[sae.cfg.hook].float()
            label = labels[rows].clone()
            label[label < 0] = 26
            code = sae.encode(x)
            on = code.values > 0
            fires.index_put_(
                (code.cols[on], label[code.rows[on]]),
                torch.ones(int(on.sum()), dtype=torch.int64),
                accumulate=True,
            )
            keep = ~sae.passthrough(x)
            x_sum.index_add_(0, label[keep], (x[keep] * sae.cfg.input_scale - sae.b_dec).double())
            x_count.index_add_(0, label[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
            if len(values) < 8:
                values.append(code.values[on])
    return {
        "fires": fires,
        "x_sum": x_sum,
        "x_count": x_count,
        "median_value": torch.cat(values).median(),
    }


def install_letter_parents(
    sae, counts: dict[str, torch.Tensor], letters: list[int]
) -> torch.Tensor:
    """Turn the len(letters) least-used latents into letter latents (in place); returns their
    ids."""
    slots = torch.argsort(counts["fires"].sum(1))[: len(letters)]
    x_sum, x_count = counts["x_sum"], counts["x_count"]
    mean_in = torch.stack([x_sum[L] / x_count[L] for L in letters])
    mean_out = torch.stack(
        [(x_sum[:26].sum(0) - x_sum[L]) / (x_count[:26].sum() - x_count[L]) for L in letters]
    )
    install_parents(sae, slots, mean_in, mean_out, float(counts["median_value"]))
    return slots


def oracle_edges(fires: torch.Tensor, letters: list[int], slots: torch.Tensor) -> torch.Tensor:
    words = fires[:, :26].sum(1)
    src, dst = [], []
    for L, slot in zip(letters, slots.tolist(), strict=True):
        children = ((words >= MIN_FIRES) & (fires[:, L] >= PURITY * words)).nonzero().squeeze(1)
        children = children[~torch.isin(children, slots)]
        src.append(children)
        dst.append(torch.full_like(children, slot))
    return torch.stack([torch.cat(src), torch.cat(dst)])


def prepare(args, model) -> tuple[list[int], torch.Tensor, Path]:
    """Steps 1-3 (cached): letters, the SAE with parents, its stats, the edge files."""
    out, sae = Path(args.out), load_sae(args.base).eval()
    base_dir, stats_dir = out / "base" / sae.cfg.hook, out / "stats"
    eval_data = letter_task_data(
        ActivationStore(args.eval_store),
        sae.cfg.hook,
        model.tokenizer,
        max_tokens=args.letter_tokens,
    )
    letters = pick_letters(eval_data.labels, eval_data.token_ids)
    if not (out / "parents.safetensors").exists():
        store = ActivationStore(args.store)
        token_ids = torch.cat(
            [store.shard(s)["token_ids"].long() for s in range(len(store.manifest.shards))]
        )
        n_tokens = min(args.tokens, len(token_ids))
        labels = first_letter_labels(token_ids[:n_tokens], model.tokenizer)
        counts = letter_counts(sae, store, labels, n_tokens)
        slots = install_letter_parents(sae, counts, letters)
        save_sae(sae, base_dir)
        save_file(
            {
                "slots": slots,
                "edge_index": oracle_edges(counts["fires"], letters, slots).contiguous(),
            },
            out / "parents.safetensors",
        )
    parents = load_file(out / "parents.safetensors")
    stats = coactivation_stats(
        StatsConfig(store=args.store, sae=str(base_dir), out=str(stats_dir), tokens=args.tokens)
    )
    for name, edges in (
        ("oracle", parents["edge_index"]),
        ("cooccurrence", parent_edges(stats, parents["slots"], args.cut, MIN_FIRES)),
    ):
        save_file({"edge_index": edges.contiguous()}, out / f"edges-{name}.safetensors")
    return letters, parents["slots"], stats_dir


def train_runs(args, stats_dir: Path) -> dict[str, Path]:
    """Step 4 (cached): per seed, the gates-shut control and one run per edge set."""
    out, runs = Path(args.out), {}
    for seed in args.seeds:
        for name in ("shut", *EDGE_SETS):
            runs[f"{name}-s{seed}"] = run = out / f"gsae-{name}-s{seed}"
            if (run / "graph.json").exists():
                continue
            # shut: any set, never opened
            edges = out / f"edges-{'oracle' if name == 'shut' else name}.safetensors"
            train_graph(
                GraphTrainConfig(
                    store=args.store,
                    stats=str(stats_dir),
                    out=str(run),
                    tokens=args.tokens,
                    seed=seed,
                    wandb="disabled",
                    edges=str(edges),
                    resume=(run / "checkpoint.safetensors").exists(),
                    **(GATES_SHUT if name == "shut" else HELD_OPEN),
                )
            )
    return runs


def evaluate(args, runs: dict[str, Path], model) -> dict:
    """Step 5 (cached per run): held-out reconstruction and letters, with and without the edges."""
    eval_store = ActivationStore(args.eval_store)
    data = None
    results = {}
    for key, run in runs.items():
        # older eval-parents.json lack Chanin-style absorption
        path = run / "eval-parents-chanin.json"
        if not path.exists():
            result = {}
            for edges in (True, False):
                gsae = load_graph_sae(run) if edges else without_edges(load_graph_sae(run))
                data = data or letter_task_data(
                    eval_store, gsae.sae.cfg.hook, model.tokenizer, max_tokens=args.letter_tokens
                )
                recon = graph_metrics(gsae, eval_store)
                letters = letter_metrics(AsSAE(gsae).encode, data, decoder=gsae.sae.W_dec.detach())
                result["edges" if edges else "no_edges"] = {
                    "fvu": recon["fvu"],
                    "l0": recon["l0"],
                    "implied_per_token": recon["implied_per_token"],
                    "n_edges": int(gsae.active_edges()[0].shape[1]),
                    "absorption": letters["absorption"],
                    "full_absorption": letters["full_absorption"],
                    "absorption_fraction": letters["absorption_fraction"],
                    "sparse_probe": {str(k): acc for k, acc in letters["sparse_probe"].items()},
                    "per_letter_absorption": {
                        LETTERS[L]: p["absorption"] for L, p in letters["per_letter"].items()
                    },
                }
            path.write_text(json.dumps(result, indent=2))
        results[key] = json.loads(path.read_text())
    return results


def markdown(results: dict, seeds: list[int]) -> str:
    def cell(name: str, field: str, edges: str = "edges") -> str:
        values = [results[f"{name}-s{s}"][edges][field] for s in seeds]
        if field == "sparse_probe":
            return "; ".join(", ".join(f"{v[k]:.3f}" for k in sorted(v, key=int)) for v in values)
        return ", ".join(
            f"{v:.4f}" if field == "fvu" else f"{v:.3f}" if isinstance(v, float) else str(v)
            for v in values
        )

    lines = [
        f"| seeds {', '.join(map(str, seeds))} | edges | FVU | L0 | implied / token | absorption "
        "(edges removed) "
        "| Chanin full absorption (edges removed) | absorption fraction | sparse probe k = 1, 2, "
        "5 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("shut", *EDGE_SETS):
        lines.append(
            f"| {name} | {cell(name, 'n_edges')} | {cell(name, 'fvu')} | {cell(name, 'l0')} | "
            f"{cell(name, 'implied_per_token')} "
            f"| {cell(name, 'absorption')} ({cell(name, 'absorption', 'no_edges')}) "
            f"| {cell(name, 'full_absorption')} ({cell(name, 'full_absorption', 'no_edges')}) | "
            f"{cell(name, 'absorption_fraction')} "
            f"| {cell(name, 'sparse_probe')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for flag in ("store", "eval_store", "base", "out"):
        parser.add_argument(f"--{flag.replace('_', '-')}", required=True)
    parser.add_argument(
        "--tokens",
        type=int,
        default=500_000,
        help="training-store tokens for counts, stats and training",
    )
    parser.add_argument(
        "--letter-tokens", type=int, default=100_000, help="held-out tokens of the letters metric"
    )
    parser.add_argument(
        "--cut",
        type=float,
        default=0.3,
        help="co-occurrence children: P(parent fires | child fires) above this",
    )
    parser.add_argument("--seeds", type=lambda v: [int(s) for s in v.split(",")], default=[1, 2, 3])
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    model = load_model("smollm2-135m")
    letters, slots, stats_dir = prepare(args, model)
    results = evaluate(args, train_runs(args, stats_dir), model)
    summary = {
        "letters": [LETTERS[L] for L in letters],
        "slots": slots.tolist(),
        "cut": args.cut,
        "runs": results,
    }
    (Path(args.out) / "parents.json").write_text(json.dumps(summary, indent=2))
    print(markdown(results, args.seeds))


if __name__ == "__main__":
    main()
