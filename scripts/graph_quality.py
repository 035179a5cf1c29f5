"""SmolLM2 layer 15: (a) TopK vs (b) TopK + post-hoc co-occurrence graph vs (c) graph autoencoder.

Equal width (9216 latents) and equal training tokens (1M): (a) is a TopK SAE trained on 1M tokens;
(b) is (a) plus its co-activation candidates cut to (c)'s number of edges; (c) starts from a TopK
SAE trained on the first 500k tokens and trains the graph autoencoder for 500k more (seeds 1-3).
With --parents N (the current table: N = 20, --tag=-parents), (c) trains from that SAE with N
label-free parents injected (graphs.parents) on their child -> parent edges, gates held open, and a
fifth column gives the same fine-tune with every gate shut. Every step caches its output under
--out, so a killed run resumes. Writes the table into docs/graphs.md (between its markers) and
<out>/graph_quality{tag}.json.

    python scripts/graph_quality.py --store out/l15-train-1m --eval-store out/l15-heldout \\
        --pair-store out/l15-l18-300k --topk out/quality/topk/blocks.15.hook_resid_post \\
        --base out/graph/topk-l15-500k/blocks.15.hook_resid_post \\
        --target out/graph/topk-l18-300k/blocks.18.hook_resid_post --out out/graph
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import torch

from graphs.coactivation import CoactivationStats, StatsConfig, coactivation_stats
from graphs.coders import AsSAE
from graphs.crosslayer import TransitionConfig, fit_transition
from graphs.eval import (
    attribution_correlation,
    edge_interventions,
    edge_jaccard,
    graph_metrics,
    letter_metrics,
    letter_task_data,
    without_edges,
)
from graphs.io import load_graph_sae
from graphs.parents import GATES_SHUT, HELD_OPEN, ParentsConfig, build_parents
from graphs.train import GraphTrainConfig, train_graph
from sae.evaluate import heldout_windows, reconstruction_metrics, splice_metrics
from sae.io import load_sae
from sae.models import load_model
from sae.store import ActivationStore

SEEDS = (1, 2, 3)  # the default of --seeds
TEXTS = [
    "And God said, Let there be light: and there was light.",
    "To be, or not to be, that is the question.",
    "The king went down to the sea with all his ships.",
    "Of Man's first disobedience, and the fruit of that forbidden tree",
    "In the beginning was the Word, and the Word was with God.",
    "Now is the winter of our discontent made glorious summer",
]


def cached(path: Path, compute):
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))
    return value


def build(args) -> dict[str, Path]:
    """Stats of (a) and of the base SAE, the three graph autoencoders (with --parents: the parents,
    and per seed the gates-shut control too), the two transitions."""
    out = Path(args.out)
    dirs = {"stats_a": out / "stats-topk1m"}
    if args.parents:
        dirs["parents"] = build_parents(
            ParentsConfig(
                store=args.store,
                sae=args.base,
                out=str(out / f"parents{args.parents}"),
                tokens=args.half_tokens,
                n_parents=args.parents,
            )
        )
        dirs["stats_base"] = dirs["parents"] / "stats"
    else:
        dirs["stats_base"] = out / ("stats-l15-residual" if args.residual_stats else "stats-l15")
    for key, sae in (("stats_a", args.topk), ("stats_base", args.base)):
        if not (dirs[key] / "stats.json").exists():
            residual = key == "stats_base" and args.residual_stats
            coactivation_stats(
                StatsConfig(
                    store=args.store,
                    sae=sae,
                    out=str(dirs[key]),
                    tokens=args.half_tokens,
                    residual=residual,
                )
            )
    runs = (
        [("c", "gsae", HELD_OPEN), ("ctl", "gsae-shut", GATES_SHUT)]
        if args.parents
        else [("c", "gsae", {})]
    )
    for seed, (key, name, recipe) in itertools.product(args.seeds, runs):
        run = dirs[f"{key}{seed}"] = out / f"{name}-s{seed}{args.tag}"
        if not (run / "graph.json").exists():
            edges = str(dirs["parents"] / "edges.safetensors") if args.parents else ""
            train_graph(
                GraphTrainConfig(
                    store=args.store,
                    stats=str(dirs["stats_base"]),
                    out=str(run),
                    tokens=args.half_tokens,
                    seed=seed,
                    wandb="disabled",
                    resume=(run / "checkpoint.safetensors").exists(),
                    **{"edge_coeff": args.edge_coeff, "edges": edges, **recipe, **args.graph_opt},
                )
            )
    for key, source in (("trans_a", args.topk), ("trans_c", str(dirs[f"c{args.seeds[0]}"]))):
        dirs[key] = out / (f"transition-{key[-1]}" + (args.tag if key == "trans_c" else ""))
        if not (dirs[key] / "transition.json").exists():
            fit_transition(
                TransitionConfig(
                    store=args.pair_store, source=source, target=args.target, out=str(dirs[key])
                )
            )
    return dirs


def reconstruction(args, dirs, model, windows) -> dict:
    out = Path(args.out)
    eval_store = ActivationStore(args.eval_store)
    rows = {
        "a": cached(
            out / "eval-a.json",
            lambda: {
                **reconstruction_metrics(load_sae(args.topk), eval_store),
                **splice_metrics(model, load_sae(args.topk), windows),
            },
        )
    }
    kinds = ("c", "ctl") if args.parents else ("c",)
    for key, seed in itertools.product(kinds, args.seeds):

        def compute(key=key, seed=seed):
            gsae = load_graph_sae(dirs[f"{key}{seed}"])
            result = graph_metrics(gsae, eval_store)
            if seed == args.seeds[0]:
                result.update(splice_metrics(model, AsSAE(gsae), windows))
            return result

        rows[f"{key}{seed}"] = cached(out / f"eval-{key}{seed}{args.tag}.json", compute)
    first = dirs[f"c{args.seeds[0]}"]
    rows["c_no_edges"] = cached(
        out / f"eval-c{args.seeds[0]}-no-edges{args.tag}.json",
        lambda: graph_metrics(without_edges(load_graph_sae(first)), eval_store),
    )
    return rows


def letters(args, dirs, model) -> dict:
    """Letters of (a), of (c)'s first seed with and without its edges, and with --parents of every
    seed of (c) and of its control ("c_seeds", "ctl_seeds")."""
    out = Path(args.out)
    topk = load_sae(args.topk)
    data = letter_task_data(
        ActivationStore(args.eval_store),
        topk.cfg.hook,
        model.tokenizer,
        max_tokens=args.letter_tokens,
    )

    # "-chanin": also Chanin-style absorption (older caches lack it)
    def score(name: str, gsae) -> dict:
        return cached(
            out / f"letters-chanin-{name}.json",
            lambda: _json_keys(
                letter_metrics(AsSAE(gsae).encode, data, decoder=gsae.sae.W_dec.detach())
            ),
        )

    first = dirs[f"c{args.seeds[0]}"]
    result = {
        "a": cached(
            out / "letters-chanin-a.json",
            lambda: _json_keys(letter_metrics(topk.encode, data, decoder=topk.W_dec.detach())),
        ),
        "c": score(f"c{args.tag}", load_graph_sae(first)),
        "c_no_edges": score(f"c-no-edges{args.tag}", without_edges(load_graph_sae(first))),
    }
    if args.parents:
        for key in ("c", "ctl"):
            result[f"{key}_seeds"] = [
                result["c"]
                if (key, seed) == ("c", args.seeds[0])
                else score(f"{key}{seed}{args.tag}", load_graph_sae(dirs[f"{key}{seed}"]))
                for seed in args.seeds
            ]
    return result


def _json_keys(value):
    if isinstance(value, dict):
        return {str(k): _json_keys(v) for k, v in value.items()}
    return value


def stability(dirs, seeds) -> dict:
    """Pairwise Jaccard of the seeds' active edges vs the same edge counts with shuffled targets."""
    graphs = [load_graph_sae(dirs[f"c{s}"]).active_edges()[0] for s in seeds]
    n = 9216
    pairs = list(itertools.combinations(range(len(seeds)), 2))
    if not pairs:
        return {"jaccard": None, "null": None, "edges": [e.shape[1] for e in graphs]}
    observed = [edge_jaccard(graphs[i], graphs[j], n) for i, j in pairs]
    g = torch.Generator().manual_seed(0)

    def shuffled(edges):
        return torch.stack([edges[0], edges[1][torch.randperm(edges.shape[1], generator=g)]])

    null = [edge_jaccard(shuffled(graphs[i]), shuffled(graphs[j]), n) for i, j in pairs]
    return {
        "jaccard": sum(observed) / len(pairs),
        "null": sum(null) / len(pairs),
        "edges": [e.shape[1] for e in graphs],
    }


def posthoc_stability(args, n_edges: int) -> dict:
    """(b)'s stability: its top-n_edges graph from three disjoint thirds of the tokens."""
    out, graphs = Path(args.out), []
    for third in range(3):
        directory = out / f"stats-topk1m-third{third}"
        if not (directory / "stats.json").exists():
            coactivation_stats(
                StatsConfig(
                    store=args.store,
                    sae=args.topk,
                    out=str(directory),
                    tokens=args.half_tokens // 3,
                    skip_tokens=third * (args.half_tokens // 3),
                )
            )
        edges, scores = CoactivationStats.load(directory).candidates(32)
        graphs.append(edges[:, torch.argsort(scores, descending=True)[:n_edges]])
    pairs = [(0, 1), (0, 2), (1, 2)]
    return {"jaccard": sum(edge_jaccard(graphs[i], graphs[j], 9216) for i, j in pairs) / 3}


def faithfulness(args, dirs, model) -> dict:
    """Edges of each source's transition to layer 18, checked by ablation; paths vs grad × act."""
    from graphs.crosslayer import TransitionGraph
    from graphs.explain import Explainer

    out, result = Path(args.out), {}
    for key, source in (("a", args.topk), ("c", dirs[f"c{args.seeds[0]}"])):

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

        result[key] = cached(
            out / f"faithfulness-{key}{args.tag if key == 'c' else ''}.json", compute
        )
    return result


def _fmt(v, digits=3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _seeds(values: list[float]) -> str:
    """One value, or the mean over seeds with each seed in brackets."""
    if len(values) == 1:
        return _fmt(values[0])
    return f"{_fmt(sum(values) / len(values))} ({', '.join(map(_fmt, values))})"


def _letter(let: dict, key: str, field: str, k: str | None = None) -> str:
    if key not in let and f"{key}_seeds" not in let:  # the control without --parents
        return "—"
    if f"{key}_seeds" not in let:
        value = let[key][field]
        return _fmt(value[k] if k else value)
    return _seeds([(r[field][k] if k else r[field]) for r in let[f"{key}_seeds"]])


def markdown(args, rows, let, stab, post_stab, faith, dirs) -> str:
    """The comparison table; with --parents, a fifth column (the gates-shut control) and (c)'s
    letter rows as the mean over seeds (each seed in brackets)."""
    head = (
        "| | (a) TopK | (b) TopK + post-hoc graph | (c) graph autoencoder "
        f"| (c) seed {args.seeds[0]}, edges removed |"
    )

    def extra(cell) -> str:  # the control's column
        return f" {cell} |" if args.parents else ""

    table = [
        head + extra("(c)'s control: same fine-tune, gates shut"),
        "|---|---|---|---|---|" + ("---|" if args.parents else ""),
        *_sae_rows(args, rows, let, extra),
        *_graph_rows(args, rows, stab, post_stab, faith, extra),
    ]
    return "\n".join(table)


def _sae_rows(args, rows, let, extra) -> list[str]:
    """Reconstruction, first-letter absorption and probing rows."""
    a, c, bare, lb = rows["a"], rows[f"c{args.seeds[0]}"], rows["c_no_edges"], let["c_no_edges"]
    cs = [rows[f"c{s}"] for s in args.seeds]
    ctl = [rows[f"ctl{s}"] for s in args.seeds] if args.parents else []
    return [
        f"| L0 after propagation (before) | {_fmt(a['l0'], 1)} | {_fmt(a['l0'], 1)} | "
        f"{_fmt(c['l0'], 1)} ({_fmt(c['l0_evidence'], 1)}) | {_fmt(bare['l0'], 1)} |"
        + extra(ctl and _fmt(ctl[0]["l0"], 1)),
        f"| FVU (held-out) | {_fmt(a['fvu'])} | {_fmt(a['fvu'])} | {_fmt(c['fvu'])} (seeds: "
        f"{', '.join(_fmt(r['fvu'], 4) for r in cs)}) | {_fmt(bare['fvu'])} |"
        + extra(
            ctl and f"{_fmt(ctl[0]['fvu'])} (seeds: {', '.join(_fmt(r['fvu'], 4) for r in ctl)})"
        ),
        f"| dead latents (silent on the held-out tokens) | {_fmt(a['dead_fraction'])} | "
        f"{_fmt(a['dead_fraction'])} | {_fmt(c['dead_fraction'])} | "
        f"{_fmt(bare['dead_fraction'])} |" + extra(ctl and _fmt(ctl[0]["dead_fraction"])),
        f"| CE loss recovered | {_fmt(a['ce_loss_recovered'])} | "
        f"{_fmt(a['ce_loss_recovered'])} | {_fmt(c.get('ce_loss_recovered'))} | — |"
        + extra(ctl and _fmt(ctl[0].get("ce_loss_recovered"))),
        *[
            f"| {label} (lower is better) | {_fmt(let['a'][key])} | {_fmt(let['a'][key])} | "
            f"{_letter(let, 'c', key)} | {_fmt(lb[key])} |" + extra(_letter(let, "ctl", key))
            for label, key in (
                ("first-letter absorption (upper bound)", "absorption"),
                ("absorption, Chanin et al.'s full rate", "full_absorption"),
                ("absorption fraction (SAEBench-style)", "absorption_fraction"),
            )
        ],
        *[
            f"| sparse probe accuracy, k = {k} | {_fmt(let['a']['sparse_probe'][str(k)])} | "
            f"{_fmt(let['a']['sparse_probe'][str(k)])} | "
            f"{_letter(let, 'c', 'sparse_probe', str(k))} | "
            f"{_fmt(lb['sparse_probe'][str(k)])} |"
            + extra(_letter(let, "ctl", "sparse_probe", str(k)))
            for k in (1, 2, 5)
        ],
        f"| dense probe accuracy (reference) | {_fmt(let['a']['dense_probe'])} | "
        f"{_fmt(let['a']['dense_probe'])} | {_fmt(let['c']['dense_probe'])} | — |" + extra("—"),
    ]


def _graph_rows(args, rows, stab, post_stab, faith, extra) -> list[str]:
    """The graph's size, stability and faithfulness rows."""
    cs = [rows[f"c{s}"] for s in args.seeds]
    ctl = [rows[f"ctl{s}"] for s in args.seeds] if args.parents else []
    n_edges = stab["edges"][0]

    def mean(key: str) -> float:
        return sum(r[key] for r in cs) / len(cs)

    fa, fc = faith["a"], faith["c"]
    return [
        f"| implied features per held-out token | — | — | {_fmt(mean('implied_per_token'), 4)} "
        "| 0 |" + extra(ctl and _fmt(ctl[0]["implied_per_token"], 4)),
        f"| mean out-degree (edges) | — | {_fmt(n_edges / 9216, 3)} ({n_edges}, cut to (c)'s "
        f"count) | {_fmt(mean('mean_degree'), 3)} ({', '.join(map(str, stab['edges']))}) | 0 |"
        + extra("0"),
        f"| edge stability, Jaccard over {len(args.seeds)} seeds (shuffled null) | — | "
        f"{_fmt(post_stab['jaccard'])} (data thirds) | {_fmt(stab['jaccard'])} "
        f"({_fmt(stab['null'], 4)}) | — |" + extra("—"),
        "| cross-layer edges confirmed by ablation (null) | "
        f"{_fmt(fa['edge_confirmed_fraction'])} ({_fmt(fa['null_confirmed_fraction'])}) | "
        f"same as (a) | {_fmt(fc['edge_confirmed_fraction'])} "
        f"({_fmt(fc['null_confirmed_fraction'])}) | — |" + extra("—"),
        f"| paths confirmed on the logit | {_fmt(fa['path_confirmed_fraction'])} | same as "
        f"(a) | {_fmt(fc['path_confirmed_fraction'])} | — |" + extra("—"),
        f"| path score vs grad × act (Pearson) | {_fmt(fa['attribution_pearson'])} | same "
        f"as (a) | {_fmt(fc['attribution_pearson'])} | — |" + extra("—"),
        "| transition L15 → L18: code FVU, nonzero weights | "
        f"{_fmt(fa['transition_code_fvu'])}, {fa['transition_nonzero']} | same as "
        f"(a) | {_fmt(fc['transition_code_fvu'])}, {fc['transition_nonzero']} | — |" + extra("—"),
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for flag in ("store", "eval_store", "pair_store", "topk", "base", "target", "out"):
        parser.add_argument(f"--{flag.replace('_', '-')}", required=True)
    parser.add_argument("--half-tokens", type=int, default=500_000)
    parser.add_argument("--ce-tokens", type=int, default=8192)
    parser.add_argument("--letter-tokens", type=int, default=100_000)
    parser.add_argument("--doc", default="docs/graphs.md")
    parser.add_argument(
        "--edge-coeff", type=float, default=GraphTrainConfig.edge_coeff, help="λ_edge of (c)"
    )
    parser.add_argument(
        "--tag", default="", help="suffix of (c)'s run directories (to compare settings)"
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
        help="a GraphTrainConfig field for (c), e.g. lr=2.67e-3 (repeatable; use a new --tag)",
    )
    parser.add_argument(
        "--parents",
        type=int,
        default=0,
        metavar="N",
        help="(c) = the label-free parents recipe (graphs.parents) with N parents, gates held "
        "open, plus its gates-shut control per seed (0: the plain graph autoencoder); use a new "
        "--tag",
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
    dirs = build(args)
    model = load_model("smollm2-135m")
    rows = reconstruction(args, dirs, model, heldout_windows(model, args.ce_tokens))
    let = letters(args, dirs, model)
    stab = stability(dirs, args.seeds)
    post_stab = cached(
        Path(args.out) / f"stability-b{args.tag}.json",
        lambda: posthoc_stability(args, max(stab["edges"][0], 1)),
    )
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
    table = markdown(args, rows, let, stab, post_stab, faith, dirs)
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


def write_table(doc: Path, table: str, tag: str) -> None:
    """Replace the text between `<!-- table{tag} -->` and `<!-- /table{tag} -->` in doc (the prose
    around it stays); a doc without those markers gets the table appended under them."""
    start, end = f"<!-- table{tag} -->", f"<!-- /table{tag} -->"
    text = doc.read_text() if doc.exists() else ""
    if start in text and end in text:
        text = (
            text[: text.index(start) + len(start)] + "\n" + table + "\n" + text[text.index(end) :]
        )
    else:
        text += f"\n{start}\n{table}\n{end}\n"
    doc.write_text(text)


if __name__ == "__main__":
    main()
