"""The main job (`make demo`): real activations of SmolLM2-135M-Instruct, then an SAE on them.

1. Harvest: 200k tokens of Shakespeare, Milton and the KJV through the model, residual stream after
   block 15 (the forward stops there), float16 shards under out/demo/store.
2. Learn: a TopK SAE (k=32, 8x width) on those activations, under out/demo/sae.
3. Evaluate on held-out documents: FVU, L0, dead fraction, and CE loss recovered by splicing the
   SAE into the model.
4. Graph: co-activation statistics of the SAE's features, a small adaptive sparse GNN autoencoder
   started from the SAE (out/demo/graph) and its held-out metrics.
5. Release: the SAE's features scanned over the held-out store into a feature dataset (parquet +
   dataset card, SAELens weights, Neuronpedia and circuit JSON) with an offline dashboard under
   out/demo/release. Its labels (the tokens each feature peaks on) name every feature printed
   below as `id[label]`.
6. Explain: one sentence token by token (evidence features, features the graph implied, direct
   paths to the predicted token).
7. Probes: a dense and a sparse (16 SAE features) probe for "is this Python code?" trained on
   stdlib code vs English prose, half of it modern (Python's documentation and docstrings), half
   17th-century, calibrated to 1% false positives on the running pooled score a monitor checks
   after every token; then a `Lens` scoring texts (per-token scores, top features) and monitoring
   generations: silent on prose, firing on code.
8. Serve: the split-inference engine (paged KV cache, prefix cache, continuous batching) answers
   three chat prompts behind one shared system prompt; the later ones reuse its cached KV blocks
   and the feature pages beside them. The feature hook inside reports the code probe's score and
   explains each answer's first token through the graph autoencoder's features.
The last line printed is the dashboard's path. Training runs log to wandb offline (under their
out directories) and silently; `--wandb online` syncs them, WANDB_SILENT=false shows wandb's
output. Killed half-way? Run it again: every stage resumes where it stopped or is skipped when done.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from sae import ActivationStore, HarvestConfig, harvest, load_model
from sae.evaluate import heldout_windows, reconstruction_metrics, splice_metrics
from sae.io import load_sae
from sae.train import TrainConfig, train

HOOK = "blocks.15.hook_resid_post"


def describe(store: ActivationStore, tokenizer, seconds: float) -> dict:
    """What a newcomer wants to see: how much landed, how fast, and what the vectors look like."""
    sample = store.rows(torch.arange(0, len(store), max(1, len(store) // 4096)))
    acts = sample[HOOK]  # [n_sample, d_model] float32
    norms = acts.norm(dim=1)
    first_window = store.rows(torch.arange(store.manifest.context_size - 1))
    return {
        "store": str(store.directory.resolve()),
        "tokens": len(store),
        "shards": len(store.manifest.shards),
        "disk_mb": round(store.summary()["bytes"] / 1e6, 1),
        "harvest_seconds": round(seconds, 1),
        "tokens_per_second": round(len(store) / seconds, 1) if seconds > 1 else None,
        "residual_norm": {
            "median": round(norms.median().item(), 1),
            "p99": round(norms.quantile(0.99).item(), 1),
            "max": round(norms.max().item(), 1),
        },
        "largest_dims": acts.abs().mean(0).topk(3).indices.tolist(),  # the massive-activation dims
        "documents": len(
            {
                d
                for i in range(len(store.manifest.shards))
                for d in store.shard(i)["doc_ids"].tolist()
            }
        ),
        "first_window_text": tokenizer.decode(first_window["token_ids"].tolist())[:200],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--out", default="out/demo")
    parser.add_argument(
        "--wandb",
        choices=("offline", "online", "disabled"),
        default="offline",
        help="wandb mode of the SAE and graph training runs (quiet unless WANDB_SILENT=false)",
    )
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")  # no run banners or summary blocks in the demo

    model = load_model("smollm2-135m")
    cfg = HarvestConfig(
        out=f"{args.out}/store",
        model="smollm2-135m",
        hooks=HOOK,
        tokens=args.tokens,
        context_size=128,
    )
    started = time.perf_counter()
    store = harvest(cfg, model)
    print(
        json.dumps(
            {"harvest": describe(store, model.tokenizer, time.perf_counter() - started)}, indent=2
        )
    )
    print(json.dumps({"sae": train_and_evaluate(model, args)}, indent=2))
    print(json.dumps({"graph": graph(args)}, indent=2))
    released, labels = release(model, args)
    print(json.dumps({"release": released}, indent=2))
    explain(model, args, labels)
    print(json.dumps({"probes": probes_and_lens(model, args, labels)}, indent=2))
    print(json.dumps({"serve": serve(model, args, labels)}, indent=2))
    print(f"dashboard: {(Path(args.out) / 'release' / 'dashboard' / 'index.html').resolve()}")


def named(feature: int, labels: list[str]) -> str:
    """A feature id with its release label (the tokens it peaks on): `1234['def' / 'class']`."""
    label = labels[feature] if 0 <= feature < len(labels) else "?"
    return f"{feature}[{label[:40]}]"


def train_and_evaluate(model, args) -> dict:
    sae_dir = f"{args.out}/sae/{HOOK}"
    if not (Path(sae_dir) / "sae.safetensors").exists():
        run = Path(f"{args.out}/sae")
        train(
            TrainConfig(
                store=f"{args.out}/store",
                out=str(run),
                hooks=HOOK,
                arch="topk",
                k=32,
                expansion=8,
                tokens=args.tokens,
                batch_size=4096,
                checkpoint_every=10,
                resume=(run / "checkpoint.safetensors").exists(),
                wandb=args.wandb,
            )
        )
    heldout = harvest(
        HarvestConfig(
            out=f"{args.out}/heldout",
            model="smollm2-135m",
            hooks=HOOK,
            tokens=16_384,
            context_size=128,
            split="heldout",
        ),
        model,
    )
    sae = load_sae(sae_dir)
    windows = heldout_windows(model, n_tokens=2016, seed=1)  # 16 windows of 128
    result = {"sae": sae_dir, "n_latents": sae.cfg.n_latents, "k": sae.cfg.k}
    result.update({k: round(v, 4) for k, v in reconstruction_metrics(sae, heldout).items()})
    result.update({k: round(v, 4) for k, v in splice_metrics(model, sae, windows).items()})
    return result


def graph(args) -> dict:
    from graphs.coactivation import StatsConfig, coactivation_stats
    from graphs.eval import graph_metrics
    from graphs.io import load_graph_sae
    from graphs.train import GraphTrainConfig, train_graph

    stats, graph = Path(f"{args.out}/stats"), Path(f"{args.out}/graph")
    coactivation_stats(
        StatsConfig(store=f"{args.out}/store", sae=f"{args.out}/sae/{HOOK}", out=str(stats))
    )
    if not (graph / "graph.json").exists():
        train_graph(
            GraphTrainConfig(
                store=f"{args.out}/store",
                stats=str(stats),
                out=str(graph),
                tokens=args.tokens // 2,
                checkpoint_every=10,
                resume=(graph / "checkpoint.safetensors").exists(),
                wandb=args.wandb,
            )
        )
    metrics = graph_metrics(load_graph_sae(graph), ActivationStore(f"{args.out}/heldout"))
    return {"graph": str(graph.resolve()), **{k: round(v, 4) for k, v in metrics.items()}}


def explain(model, args, labels: list[str]) -> None:
    """One sentence token by token through the graph autoencoder (its features keep the SAE's
    ids, so the release's labels name them)."""
    from graphs.explain import load_explainer

    explained = load_explainer(model, f"{args.out}/graph").explain(
        EXAMPLE, top_features=3, top_paths=2
    )
    lines = []
    for p in explained["positions"]:
        evidence = [named(f, labels) for f, _ in p["evidence"]]
        implied = [
            f"{named(i['feature'], labels)}←{[s for s, _ in i['from']]}" for i in p["implied"]
        ]
        direct = [f"{named(d['feature'], labels)}:{d['weight']:+.2f}" for d in p["direct"]]
        lines.append(
            f"{p['token']!r:>12} → {p['predicted']!r:<10} evidence {evidence} "
            f"implied {implied} direct {direct}"
        )
    print("\n".join(["explained: " + EXAMPLE, *lines]))


EXAMPLE = "And God said, Let there be light: and there was light."
PROBE_TEXTS = [
    "for key, value in sorted(items.items()):\n    total += value",
    "And the LORD spake unto Moses, saying",
    "The weather today is sunny with a light breeze, and it should stay warm until the evening.",
    "Can you recommend a good book to read this summer?",
]
# Modern prose (a sentence to finish, a chat question) and code: the monitor should stay silent on
# the first two and fire on the third.
MONITOR_PROMPTS = ("The weather today is", "What is the capital of France?", "def add(a, b):")


def probes_and_lens(model, args, labels: list[str]) -> dict:
    from probes.lens import Lens
    from probes.probe import Probe
    from probes.train import ProbeTrainConfig, train_probe

    sae_dir = f"{args.out}/sae/{HOOK}"
    dirs = {kind: Path(f"{args.out}/probes/code-{kind}") for kind in ("linear", "sparse")}
    for kind, out in dirs.items():
        if not (out / "probe.json").exists():
            train_probe(
                ProbeTrainConfig(
                    task="code",
                    hook=HOOK,
                    kind=kind,
                    out=str(out),
                    sae=sae_dir,
                    n_per_class=150,
                    # The threshold holds for every prefix of 8+ tokens a monitor checks (shorter
                    # ones are too noisy to calibrate on: one outlier token decides them).
                    calibrate_on="monitor",
                    min_tokens=8,
                ),
                model,
            )
    lens = Lens(model, probes=list(dirs.values()), saes=[sae_dir])
    for result in lens.score(PROBE_TEXTS):
        for name, r in result.probes.items():
            top = [
                f"{named(f['feature'], labels)}:{f['contribution']:+.2f}" for f in r.top_features
            ]
            print(
                f"{name:>12} S={r.score:+6.2f} fired={r.fired!s:<5} {result.text[:40]!r:<44} "
                f"top features {top[:3]}"
            )
    for prompt in MONITOR_PROMPTS:
        print(monitor_line(lens, prompt))
    return {name: {"dir": str(d.resolve()), **Probe.load(d).metrics} for name, d in dirs.items()}


def monitor_line(lens, prompt: str, name: str = "code-linear") -> str:
    """Generate 16 tokens under the code probe's watch: where it fired, or its highest score."""
    from probes.activations import tokenize

    watched = lens.monitor(prompt, max_new_tokens=16, trigger=name, action="none")
    threshold = lens.probes[name].threshold
    # The monitor checks the running pooled score once the prompt is read, then after each token.
    n_prompt = len(tokenize(lens.model.tokenizer, [prompt], lens.max_tokens)[0]) - 1  # no BOS
    peak = max(watched.running[name][n_prompt - 1 :])
    verdict = (
        f"FIRED at token {watched.triggered['token']} (score {watched.triggered['score']:+.2f})"
        if watched.triggered
        else "silent"
    )
    return (
        f"monitor {prompt!r} -> {watched.text!r}: {verdict}; peak checked code score {peak:+.2f} "
        f"(threshold {threshold:+.2f})"
    )


def serve(model, args, labels: list[str]) -> dict:
    from serve_hooks import LLM
    from serve_hooks.sequence import SamplingParams

    # The engine with the feature hook inside: the graph autoencoder's features and the code probe's
    # scores for every token, reasoning paths for every generated one, and the KV cache intact.
    llm = LLM(
        model,
        probes=[f"{args.out}/probes/code-linear"],
        graph=f"{args.out}/graph",
        top_n=3,
        kv_cache_gb=0.25,
        max_num_batched_tokens=256,
    )
    system = {"role": "system", "content": "You are a concise assistant. Answer in one sentence."}
    questions = [
        "What is the capital of France?",
        "Why is the sky blue?",
        "What is a prime number?",
    ]
    chats = [
        model.tokenizer.apply_chat_template(
            [system, {"role": "user", "content": q}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        for q in questions
    ]
    params = SamplingParams(max_tokens=32)
    started = time.perf_counter()
    outputs = llm.generate(chats[:1], params) + llm.generate(
        chats[1:], params
    )  # the first warms the cache
    seconds = time.perf_counter() - started
    for question, out in zip(questions, outputs, strict=True):
        code = out.features.triggers["code-linear"]  # pooled over the whole chat
        print(
            f"{question!r} -> {out.text.strip()!r} ({out.num_cached_tokens} prompt tokens "
            f"from the prefix cache; code probe {code['score']:+.2f}, threshold "
            f"{code['threshold']:+.2f}: {'FIRED' if code['fired'] else 'silent'})"
        )
        first = out.features.predictions[0]  # why the first answer token
        why = [f"{named(d['feature'], labels)}:{d['weight']:+.2f}" for d in first["direct"][:3]]
        print(
            f"    first token {model.tokenizer.decode([first['token_id']])!r}: "
            f"top direct effects {why}"
        )
    generated = sum(len(o.token_ids) for o in outputs)
    engine = llm.engine
    return {
        "generated_tokens": generated,
        "seconds": round(seconds, 2),
        "kv_blocks": engine.blocks.num_blocks,
        "prefix_hit_tokens": engine.cache.stats["prefix_hit_tokens"],
        "feature_page_tokens_reused": llm.hook.stats["reused_tokens"],
        **engine.stats,
    }


def release(model, args) -> tuple[dict, list[str]]:
    """The feature dataset and dashboard; returns its card and every feature's label."""
    from graphs import load_release
    from graphs.release.export import ExportConfig, export_release

    out = export_release(
        ExportConfig(
            sae=f"{args.out}/sae/{HOOK}",
            graph=f"{args.out}/graph",
            store=f"{args.out}/heldout",
            stats=f"{args.out}/stats",
            out=f"{args.out}/release",
            model="smollm2-135m",
            ce_tokens=1024,
            prompts=f"{EXAMPLE}|{PROBE_TEXTS[0]}",
        ),
        model,
    )
    released = load_release(out)
    card = released.card
    keys = ("width", "tokens", "fvu", "l0", "ce_loss_recovered", "dead_fraction")
    summary = {
        "release": str(out.resolve()),
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in card.items() if k in keys},
    }
    return summary, list(released.data["features"]["label"])


if __name__ == "__main__":
    main()
