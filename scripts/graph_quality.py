"""SmolLM2 layer 15: (a) TopK vs (b) TopK + post-hoc co-occurrence graph vs (c) graph autoencoder.

Equal width (9216 latents) and equal training tokens (1M): (a) is a TopK SAE trained on 1M tokens;
(b) is (a) plus its co-activation candidates cut to (c)'s number of edges; (c) starts from a TopK
SAE trained on the first 500k tokens and trains the graph autoencoder for 500k more (seeds 1-3).
With --parents N (the current table: N = 20, --tag=-parents), (c) trains from that SAE with N
label-free parents injected (graphs.parents) on their child -> parent edges, gates held open, and a
fifth column gives the same fine-tune with every gate shut. The last column, (m), is a BatchTopK
Matryoshka SAE of (a)'s width and k trained on (a)'s tokens (2 x --half-tokens), one per seed: does
the graph autoencoder beat it on absorption, sparse probing and FVU? Every step caches its output
under --out keyed by a hash of the configuration that made it and of its inputs' contents
(scripts/_cache.py), so a killed run resumes and changed settings recompute; the table quotes the
commands that produced the cached parts. Writes the table into docs/graphs.md (between its
markers) and <out>/graph_quality{tag}.json.

    python scripts/graph_quality.py --store out/l15-train-1m --eval-store out/l15-heldout \\
        --pair-store out/l15-l18-300k --topk out/quality/topk/blocks.15.hook_resid_post \\
        --base out/graph/topk-l15-500k/blocks.15.hook_resid_post \\
        --target out/graph/topk-l18-300k/blocks.18.hook_resid_post --out out/graph
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _cache import RECORD, cached_json, content_digest, keyed, record  # noqa: E402
from _graph_quality_table import made_by, markdown, write_table  # noqa: E402

from graphs.coactivation import CoactivationStats, StatsConfig, coactivation_stats  # noqa: E402
from graphs.coders import AsSAE  # noqa: E402
from graphs.crosslayer import TransitionConfig, fit_transition  # noqa: E402
from graphs.eval import (  # noqa: E402
    attribution_correlation,
    edge_interventions,
    edge_jaccard,
    graph_metrics,
    letter_metrics,
    letter_task_data,
    without_edges,
)
from graphs.io import load_graph_sae  # noqa: E402
from graphs.parents import GATES_SHUT, HELD_OPEN, ParentsConfig, build_parents  # noqa: E402
from graphs.train import GraphTrainConfig, train_graph  # noqa: E402
from sae.evaluate import heldout_windows, reconstruction_metrics, splice_metrics  # noqa: E402
from sae.io import load_sae  # noqa: E402
from sae.models import load_model  # noqa: E402
from sae.store import ActivationStore  # noqa: E402
from sae.train import TrainConfig, train  # noqa: E402

SEEDS = (1, 2, 3)  # the default of --seeds
TEXTS = [
    "And God said, Let there be light: and there was light.",
    "To be, or not to be, that is the question.",
    "The king went down to the sea with all his ships.",
    "Of Man's first disobedience, and the fruit of that forbidden tree",
    "In the beginning was the Word, and the Word was with God.",
    "Now is the winter of our discontent made glorious summer",
]


INPUT_FIELDS = ("store", "sae", "stats", "source", "target", "edges")  # paths a config reads


@functools.cache
def digest(path: str) -> str:
    return content_digest(path)


def cached(args, name: str, inputs: dict, compute):
    """compute()'s JSON value, kept under --out keyed by `inputs` (the contents of what it reads,
    its own settings) and the evaluation settings; "_command" holds the command that made it."""
    settings = {"eval_store": digest(args.eval_store), "model": args.model}
    settings |= {"ce_tokens": args.ce_tokens, "letter_tokens": args.letter_tokens}
    return cached_json(args.out, name, {**inputs, **settings}, compute)


def artefact(args, name: str, cfg, make, done: str) -> Path:
    """The directory `make(cfg)` writes, under --out keyed by cfg (less out/resume) and by the
    contents of the paths it reads; made (or resumed after a kill) only when missing."""
    key = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "resume")}
    key["inputs"] = {f: digest(str(key[f])) for f in INPUT_FIELDS if key.get(f)}
    path = keyed(args.out, name, key)
    if not ((path / done).exists() and (path / RECORD).exists()):
        changes = {"out": str(path)}
        if "resume" in dataclasses.asdict(cfg):
            changes["resume"] = (path / "checkpoint.safetensors").exists()
        make(dataclasses.replace(cfg, **changes))
        record(path, key)
    return path


def build(args) -> dict[str, Path]:
    """Stats of (a) and of the base SAE, the graph autoencoders (with --parents: the parents, and
    per seed the gates-shut control too), the Matryoshka SAEs, the two transitions."""
    dirs = {}
    if args.parents:
        parents = ParentsConfig(
            store=args.store, sae=args.base, tokens=args.half_tokens, n_parents=args.parents
        )
        dirs["parents"] = artefact(args, "parents", parents, build_parents, "edges.safetensors")
        dirs["stats_base"] = dirs["parents"] / "stats"
    else:
        stats = StatsConfig(
            store=args.store, sae=args.base, tokens=args.half_tokens, residual=args.residual_stats
        )
        dirs["stats_base"] = artefact(args, "stats-base", stats, coactivation_stats, "stats.json")
    stats_a = StatsConfig(store=args.store, sae=args.topk, tokens=args.half_tokens)
    dirs["stats_a"] = artefact(args, "stats-topk", stats_a, coactivation_stats, "stats.json")
    runs = (
        [("c", "gsae", HELD_OPEN), ("ctl", "gsae-shut", GATES_SHUT)]
        if args.parents
        else [("c", "gsae", {})]
    )
    edges = str(dirs["parents"] / "edges.safetensors") if args.parents else ""
    for seed, (key, name, recipe) in itertools.product(args.seeds, runs):
        cfg = GraphTrainConfig(
            store=args.store,
            stats=str(dirs["stats_base"]),
            tokens=args.half_tokens,
            seed=seed,
            batch_size=args.batch,
            wandb="disabled",
            **{"edge_coeff": args.edge_coeff, "edges": edges, **recipe, **args.graph_opt},
        )
        dirs[f"{key}{seed}"] = artefact(args, f"{name}-s{seed}", cfg, train_graph, "graph.json")
    for seed in args.seeds:
        dirs[f"m{seed}"] = matryoshka(args, seed)
    for key, source in (("trans_a", args.topk), ("trans_c", str(dirs[f"c{args.seeds[0]}"]))):
        cfg = TransitionConfig(
            store=args.pair_store, source=source, target=args.target, batch_size=args.batch
        )
        dirs[key] = artefact(args, f"transition-{key[-1]}", cfg, fit_transition, "transition.json")
    return dirs


def matryoshka(args, seed: int) -> Path:
    """(m): a BatchTopK Matryoshka SAE of (a)'s width and k on (a)'s tokens; its SAE directory."""
    topk = load_sae(args.topk)
    cfg = TrainConfig(
        store=args.store,
        hooks=topk.cfg.hook,
        arch="matryoshka",
        k=topk.cfg.k,
        expansion=topk.cfg.n_latents // topk.cfg.d_in,
        tokens=2 * args.half_tokens,
        batch_size=args.batch,
        seed=seed,
        wandb="disabled",
    )
    done = f"{topk.cfg.hook}/sae.safetensors"
    return artefact(args, f"matryoshka-s{seed}", cfg, train, done) / topk.cfg.hook


def reconstruction(args, dirs, model, windows) -> dict:
    """FVU, L0, dead fraction (and on each kind's first seed CE loss recovered) of (a), (c), its
    control, (c) without edges and (m)."""
    eval_store = ActivationStore(args.eval_store)

    def plain(sae_dir: str, splice: bool):
        def compute() -> dict:
            sae = load_sae(sae_dir)
            result = reconstruction_metrics(sae, eval_store)
            return {**result, **(splice_metrics(model, sae, windows) if splice else {})}

        return cached(args, "eval-sae", {"sae": digest(sae_dir), "splice": splice}, compute)

    def graph(run: Path, splice: bool, edges: bool = True):
        def compute() -> dict:
            gsae = load_graph_sae(run)
            gsae = gsae if edges else without_edges(gsae)
            result = graph_metrics(gsae, eval_store)
            return {**result, **(splice_metrics(model, AsSAE(gsae), windows) if splice else {})}

        inputs = {"graph": digest(str(run)), "splice": splice, "edges": edges}
        return cached(args, "eval-graph", inputs, compute)

    first = args.seeds[0]
    rows = {"a": plain(args.topk, True)}
    kinds = ("c", "ctl") if args.parents else ("c",)
    for key, seed in itertools.product(kinds, args.seeds):
        rows[f"{key}{seed}"] = graph(dirs[f"{key}{seed}"], seed == first)
    rows["c_no_edges"] = graph(dirs[f"c{first}"], False, edges=False)
    for seed in args.seeds:
        rows[f"m{seed}"] = plain(str(dirs[f"m{seed}"]), seed == first)
    return rows


def letters(args, dirs, model) -> dict:
    """Letters of (a), of (c)'s first seed with and without its edges, of every (m) seed
    ("m_seeds"), and with --parents of every seed of (c) and of its control ("c_seeds",
    "ctl_seeds")."""
    topk = load_sae(args.topk)
    data = letter_task_data(
        ActivationStore(args.eval_store),
        topk.cfg.hook,
        model.tokenizer,
        max_tokens=args.letter_tokens,
    )

    def score(path: str, edges: bool = True) -> dict:
        def compute() -> dict:
            if (Path(path) / "graph.json").exists():
                gsae = load_graph_sae(path)
                gsae = gsae if edges else without_edges(gsae)
                return letter_metrics(AsSAE(gsae).encode, data, decoder=gsae.sae.W_dec.detach())
            sae = load_sae(path)
            return letter_metrics(sae.encode, data, decoder=sae.W_dec.detach())

        inputs = {"coder": digest(path), "edges": edges}
        return cached(args, "letters", inputs, lambda: _json_keys(compute()))

    first = str(dirs[f"c{args.seeds[0]}"])
    result = {
        "a": score(args.topk),
        "c": score(first),
        "c_no_edges": score(first, edges=False),
        "m_seeds": [score(str(dirs[f"m{seed}"])) for seed in args.seeds],
    }
    if args.parents:
        for key in ("c", "ctl"):
            result[f"{key}_seeds"] = [score(str(dirs[f"{key}{seed}"])) for seed in args.seeds]
    return result


def _json_keys(value):
    if isinstance(value, dict):
        return {str(k): _json_keys(v) for k, v in value.items()}
    return value


def stability(dirs, seeds, n_latents: int) -> dict:
    """Pairwise Jaccard of the seeds' active edges vs the same edge counts with shuffled targets."""
    graphs = [load_graph_sae(dirs[f"c{s}"]).active_edges()[0] for s in seeds]
    pairs = list(itertools.combinations(range(len(seeds)), 2))
    if not pairs:
        return {"jaccard": None, "null": None, "edges": [e.shape[1] for e in graphs]}
    observed = [edge_jaccard(graphs[i], graphs[j], n_latents) for i, j in pairs]
    g = torch.Generator().manual_seed(0)

    def shuffled(edges):
        return torch.stack([edges[0], edges[1][torch.randperm(edges.shape[1], generator=g)]])

    null = [edge_jaccard(shuffled(graphs[i]), shuffled(graphs[j]), n_latents) for i, j in pairs]
    return {
        "jaccard": sum(observed) / len(pairs),
        "null": sum(null) / len(pairs),
        "edges": [e.shape[1] for e in graphs],
    }


def posthoc_stability(args, n_edges: int) -> dict:
    """(b)'s stability: its top-n_edges graph from three disjoint thirds of the tokens."""
    graphs, third_tokens = [], args.half_tokens // 3
    for third in range(3):
        cfg = StatsConfig(
            store=args.store, sae=args.topk, tokens=third_tokens, skip_tokens=third * third_tokens
        )
        directory = artefact(
            args, f"stats-topk-third{third}", cfg, coactivation_stats, "stats.json"
        )
        edges, scores = CoactivationStats.load(directory).candidates(32)
        graphs.append(edges[:, torch.argsort(scores, descending=True)[:n_edges]])
    pairs = [(0, 1), (0, 2), (1, 2)]
    jaccard = sum(edge_jaccard(graphs[i], graphs[j], args.n_latents) for i, j in pairs) / 3
    return {"jaccard": jaccard}


def faithfulness(args, dirs, model) -> dict:
    """Edges of each source's transition to the target layer, checked by ablation; paths vs
    grad × act."""
    from graphs.crosslayer import TransitionGraph
    from graphs.explain import Explainer

    result = {}
    for key, source in (("a", args.topk), ("c", str(dirs[f"c{args.seeds[0]}"]))):

        def compute(key=key, source=source):
            transition, meta = TransitionGraph.load(dirs[f"trans_{key}"])
            # a plain SAE: no edges
            coder = load_sae(source) if key == "a" else load_graph_sae(source)
            explainer = Explainer(model, coder, load_sae(meta["target"]), transition)
            return {
                **edge_interventions(explainer, TEXTS),
                **attribution_correlation(explainer, TEXTS),
                "transition_code_fvu": meta["code_fvu"],
                "transition_nonzero": meta["n_nonzero"],
            }

        inputs = {"source": digest(source), "transition": digest(str(dirs[f"trans_{key}"]))}
        result[key] = cached(args, "faithfulness", inputs, compute)
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for flag in ("store", "eval_store", "pair_store", "topk", "base", "target", "out"):
        parser.add_argument(f"--{flag.replace('_', '-')}", required=True)
    parser.add_argument("--model", default="smollm2-135m", help="the model the stores came from")
    parser.add_argument("--half-tokens", type=int, default=500_000)
    parser.add_argument(
        "--batch", type=int, default=4096, help="batch of (c), (m) and the transitions ((a)'s)"
    )
    parser.add_argument("--ce-tokens", type=int, default=8192)
    parser.add_argument("--letter-tokens", type=int, default=100_000)
    parser.add_argument("--doc", default="docs/graphs.md")
    parser.add_argument(
        "--edge-coeff", type=float, default=GraphTrainConfig.edge_coeff, help="λ_edge of (c)"
    )
    parser.add_argument(
        "--tag", default="", help="names the table's markers in --doc (to keep several tables)"
    )
    parser.add_argument(
        "--seeds",
        type=lambda v: [int(s) for s in v.split(",")],
        default=list(SEEDS),
        help="comma-separated seeds of (c); the first also gets CE, letters, faithfulness",
    )
    parser.add_argument(
        "--graph-opt",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a GraphTrainConfig field for (c), e.g. lr=2.67e-3 (repeatable)",
    )
    parser.add_argument(
        "--parents",
        type=int,
        default=0,
        metavar="N",
        help="(c) = the label-free parents recipe (graphs.parents) with N parents, gates held "
        "open, plus its gates-shut control per seed (0: the plain graph autoencoder)",
    )
    parser.add_argument(
        "--residual-stats",
        action="store_true",
        help="(c)'s stats also count missed features (for --graph-opt score=residual)",
    )
    args = parser.parse_args()
    args.graph_opt = graph_options(args.graph_opt)
    return args


def main() -> None:
    args = parse_args()
    args.n_latents = load_sae(args.topk).cfg.n_latents
    dirs = build(args)
    model = load_model(args.model)
    rows = reconstruction(args, dirs, model, heldout_windows(model, args.ce_tokens))
    let = letters(args, dirs, model)
    stab = stability(dirs, args.seeds, args.n_latents)
    post_stab = posthoc_stability(args, max(stab["edges"][0], 1))
    faith = faithfulness(args, dirs, model)
    summary = {
        "graph_opt": args.graph_opt,
        "seeds": args.seeds,
        "rows": rows,
        "letters": let,
        "stability_c": stab,
        "stability_b": post_stab,
        "faithfulness": faith,
    }
    (Path(args.out) / f"graph_quality{args.tag}.json").write_text(json.dumps(summary, indent=2))
    table = markdown(args, rows, let, stab, post_stab, faith, made_by(dirs, rows, let, faith))
    print(table)
    write_table(Path(args.doc), table, args.tag)


def graph_options(pairs: list[str]) -> dict:
    """FIELD=VALUE strings -> GraphTrainConfig keyword arguments, each typed like its field's
    default."""
    fields = {f.name: f for f in dataclasses.fields(GraphTrainConfig)}
    options = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in fields or not _:
            raise SystemExit(
                f"--graph-opt {pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}"
            )
        default = fields[name].default
        if isinstance(default, bool):
            options[name] = value.lower() in ("1", "true", "yes")
        else:
            options[name] = type(default)(value)
    return options


if __name__ == "__main__":
    main()
