"""Every probe kind against the dense baseline on the four built-in tasks: full data, 32 examples.

SmolLM2 layer 15 (`blocks.15.hook_resid_post`). Sparse probes read (a) the TopK SAE; graph probes
read (a) with its post-hoc co-activation graph (b), or the graph autoencoder (c) with its learned
graph. Per task and probe: test accuracy (at logit 0) and AUROC; with 32 training texts the figures
are the mean over 5 random draws. The full-data rows also give the test TPR / FPR at the threshold
calibrated to 1% FPR on held-out training negatives. Activations and codes are cached under --out,
keyed by a hash of what made them (model, hook, task, token cap, encoder: scripts/_cache.py), so a
re-run with the same settings only refits; the doc quotes the commands that made the caches.
Writes docs/probes.md (the table between its markers) and <out>/probe_quality.json.

    python scripts/probe_quality.py --sae out/quality/topk/blocks.15.hook_resid_post \\
        --stats out/graph/stats-topk1m --graph-sae out/graph/gsae-s1-ec0.001 --out out/probes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from _cache import commands_block, content_digest, current_command, keyed, record  # noqa: E402

from probes.activations import Features, Ragged, collect, encode, load_encoder  # noqa: E402
from probes.tasks import DEFAULT_AGGREGATION, TASKS, describe_task, load_task  # noqa: E402
from probes.train import (  # noqa: E402
    balanced_subset,
    calibrate_probe,
    evaluate_probe,
    fit_probe,
    graph_edges,
    split_calibration,
)
from sae.models import load_model  # noqa: E402
from sae.sae import SparseCode  # noqa: E402

HOOK = "blocks.15.hook_resid_post"  # the default of --hook
DRAWS = 5  # random 32-example training sets per task and probe
SMALL = 32
# (row label, kind, encoder key, k): encoder "a" = TopK SAE, "c" = graph autoencoder
PROBES = [("dense logistic", "linear", None, 0), ("mean difference", "mean_diff", None, 0)]
PROBES += [(f"sparse k={k} (a)", "sparse", "a", k) for k in (1, 2, 5, 16)]
PROBES += [
    ("graph query (a+b)", "graph", "a", 0),
    ("sparse k=16 (c)", "sparse", "c", 16),
    ("graph query (c)", "graph", "c", 0),
]


def task_activations(
    model, task: str, out: Path, max_tokens: int, hook: str
) -> tuple[Ragged, torch.Tensor, int, list[str], Path]:
    """(activations of train + test texts, labels, n_train, train groups, cache file), cached in
    out keyed by the model, hook, task and token cap."""
    key = {"model": model.name, "weights": model.weights_sha256, "hook": hook, "task": task}
    key["max_tokens"] = max_tokens
    path = keyed(out, f"acts-{task}", key).with_suffix(".safetensors")
    data = load_task(task)
    labels = torch.tensor(list(data["train"]["label"]) + list(data["test"]["label"]))
    if not path.exists():
        acts, _ = collect(
            model, list(data["train"]["text"]) + list(data["test"]["text"]), [hook], max_tokens
        )
        out.mkdir(parents=True, exist_ok=True)
        save_file({"values": acts[hook].values.half(), "offsets": acts[hook].offsets}, str(path))
        record(path, key)
    tensors = load_file(str(path))
    return (
        Ragged(tensors["values"].float(), tensors["offsets"]),
        labels,
        len(data["train"]),
        list(data["train"]["group"]),
        path,
    )


def task_code(encoder, encoder_dir: str, acts: Ragged, acts_path: Path) -> tuple[SparseCode, Path]:
    """The encoder's code of the cached activations, cached keyed by both (and the command)."""
    key = {"encoder": str(encoder_dir), "weights": content_digest(encoder_dir)}
    key["acts"] = acts_path.name
    path = keyed(acts_path.parent, "code", key).with_suffix(".safetensors")
    if not path.exists():
        code, _ = encode(encoder, acts)
        save_file({"values": code.values, "cols": code.cols.int(), "rows": code.rows}, str(path))
        record(path, key)
    t = load_file(str(path))
    code = SparseCode(t["values"], t["cols"].long(), t["rows"], acts.values.shape[0])
    return code, path


def run_probe(
    kind, features, y, fit_rows, test_rows, calib_rows, aggregation, k, edges, hook=HOOK
) -> dict:
    probe = fit_probe(
        kind,
        features.select(fit_rows),
        y[fit_rows],
        hook=hook,
        aggregation=aggregation,
        k=k or 16,
        edges=edges,
        sae="-",
    )
    if calib_rows is not None:
        calibrate_probe(probe, features.select(calib_rows), y[calib_rows], fpr=0.01)
    return evaluate_probe(probe, features.select(test_rows), y[test_rows])


def evaluate_task(
    task: str,
    features: dict,
    y: torch.Tensor,
    n_train: int,
    groups: list[str],
    edges: dict,
    hook: str,
) -> dict:
    fit_rows, calib_rows = split_calibration(groups, 0.2, seed=0)
    test_rows = torch.arange(n_train, y.numel())
    aggregation = DEFAULT_AGGREGATION[task]
    rows = {}
    for label, kind, encoder, k in PROBES:
        feats = features[encoder or "dense"]
        full = run_probe(
            kind,
            feats,
            y,
            fit_rows,
            test_rows,
            calib_rows,
            aggregation,
            k,
            edges.get(encoder),
            hook,
        )
        small = [
            run_probe(
                kind,
                feats,
                y,
                fit_rows[balanced_subset(y[fit_rows], SMALL, seed)],
                test_rows,
                None,
                aggregation,
                k,
                edges.get(encoder),
                hook,
            )
            for seed in range(DRAWS)
        ]
        rows[label] = {
            "full": full,
            "small": {m: [r[m] for r in small] for m in ("accuracy", "auroc")},
        }
        print(
            task,
            label,
            json.dumps({m: round(full[m], 3) for m in ("accuracy", "auroc")}),
            flush=True,
        )
    return {
        "n_fit": int(fit_rows.numel()),
        "n_calibration": int(calib_rows.numel()),
        "n_test": int(test_rows.numel()),
        "aggregation": aggregation,
        "probes": rows,
    }


def table(results: dict) -> str:
    lines = [
        "| task | probe | acc | AUROC | TPR @ 1% FPR (test FPR) | acc, 32 ex. | AUROC, 32 ex. |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, result in results.items():
        for label, row in result["probes"].items():
            full, small = row["full"], row["small"]
            mean_sd = {
                m: f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" for m, v in small.items()
            }
            lines.append(
                f"| {task} | {label} | {full['accuracy']:.3f} | {full['auroc']:.3f} | "
                f"{full['tpr_at_threshold']:.3f} ({full['fpr_at_threshold']:.3f}) | "
                f"{mean_sd['accuracy']} | {mean_sd['auroc']} |"
            )
    return "\n".join(lines)


def write_doc(doc: Path, results: dict, caches: list[Path]) -> None:
    """The table between the doc's markers, with the commands that made the cached activations
    and codes and the one that fitted the probes (this run)."""
    start, end = "<!-- table -->", "<!-- /table -->"
    text = doc.read_text() if doc.exists() else f"# Probe quality\n\n{start}\n{end}\n"
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    tasks = "\n".join(f"- **{t}**: {describe_task(t)}" for t in results)
    made = "\n".join(["Activations and codes:", "", *commands_block(caches)[2:]])
    fitted = f"Probes fitted and scored by:\n\n```bash\n{current_command()}\n```"
    body = f"{tasks}\n\n{made}\n\n{fitted}\n\n{table(results)}"
    doc.write_text(f"{before}{start}\n{body}\n{end}{after}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sae", required=True, help="(a) TopK SAE directory at layer 15")
    parser.add_argument("--stats", required=True, help="(b) co-activation stats of (a)")
    parser.add_argument("--graph-sae", required=True, help="(c) graph autoencoder directory")
    parser.add_argument("--out", default="out/probes")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", default=HOOK, help="the hook the SAEs read")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--doc", default="docs/probes.md")
    args = parser.parse_args()
    out = Path(args.out)
    model = load_model(args.model)
    encoders = {"a": load_encoder(args.sae), "c": load_encoder(args.graph_sae)}
    edges = {"a": graph_edges(args.stats), "c": graph_edges(args.graph_sae)}
    results, caches = {}, []
    sources = {"a": args.sae, "c": args.graph_sae}
    for task in args.tasks.split(","):
        acts, y, n_train, groups, acts_path = task_activations(
            model, task, out, args.max_tokens, args.hook
        )
        caches.append(acts_path)
        features = {"dense": Features(acts)}
        for key, encoder in encoders.items():
            code, code_path = task_code(encoder, sources[key], acts, acts_path)
            caches.append(code_path)
            features[key] = Features(acts, code, encoder.cfg.n_latents)
        results[task] = evaluate_task(task, features, y, n_train, groups, edges, args.hook)
    (out / "probe_quality.json").write_text(json.dumps(results, indent=2))
    write_doc(Path(args.doc), results, caches)


if __name__ == "__main__":
    main()
