"""Release a feature dataset from scratch: harvest → SAE → co-activation stats → graph →
(transition) → export, each stage resumed or skipped when already done (kill it and run it again).

    python scripts/release_features.py --out out/release-run --tokens 500000 \\
        --hook blocks.15.hook_resid_post
    python scripts/release_features.py ... --target-hook blocks.18.hook_resid_post  # + cross-layer

Layout under --out: store/ (training activations, every hook), heldout/ (held-out activations the
release is scanned over), sae/<hook>/, stats/, graph/, transition/ (with --target-hook) and release/
(the release: dataset, side files, dashboard/index.html). The pieces are the package's own commands
(`python -m sae harvest|train`, `python -m graphs stats|train|transition|export`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from graphs.coactivation import StatsConfig, coactivation_stats
from graphs.crosslayer import TransitionConfig, fit_transition
from graphs.release.export import ExportConfig, export_release
from graphs.train import GraphTrainConfig, train_graph
from sae import HarvestConfig, LoadedModel, harvest, load_model
from sae.train import TrainConfig, train


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", required=True, help="run directory (every stage's output goes under it)"
    )
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="model spec: smollm2-135m, tiny-<family>, a local HF directory, a .gguf or org/name",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument(
        "--dtype", default="auto", help="compute dtype: auto (fp32 on CPU, bf16 on CUDA), ..."
    )
    parser.add_argument(
        "--hook", default="blocks.15.hook_resid_post", help="hook whose SAE is released"
    )
    parser.add_argument(
        "--target-hook",
        default="",
        help="a later hook: also fit a transition for cross-layer edges",
    )
    parser.add_argument(
        "--tokens", type=int, default=500_000, help="training tokens (SAE and graph)"
    )
    parser.add_argument(
        "--heldout-tokens", type=int, default=100_000, help="held-out tokens the release scans"
    )
    parser.add_argument("--expansion", type=int, default=16, help="SAE width / d_model")
    parser.add_argument("--k", type=int, default=32, help="TopK latents per token")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--wandb", default="offline", help="offline, online or disabled")
    return parser.parse_args()


def harvest_stores(args: argparse.Namespace, run: Path, model: LoadedModel) -> None:
    """store/ (training activations at every hook) and heldout/ (what the release scans)."""
    hooks = ",".join(h for h in (args.hook, args.target_hook) if h)
    common = dict(model=args.model, context_size=args.context_size)
    harvest(HarvestConfig(out=str(run / "store"), hooks=hooks, tokens=args.tokens, **common), model)
    heldout = HarvestConfig(
        out=str(run / "heldout"),
        hooks=args.hook,
        tokens=args.heldout_tokens,
        split="heldout",
        **common,
    )
    harvest(heldout, model)


def train_saes(args: argparse.Namespace, run: Path) -> None:
    """sae/<hook>/ for the released hook (and the target hook), unless they are there."""
    done = (run / "sae" / args.hook / "sae.safetensors").exists()
    if done and (not args.target_hook or (run / "sae" / args.target_hook).exists()):
        return
    train(
        TrainConfig(
            store=str(run / "store"),
            out=str(run / "sae"),
            hooks=",".join(h for h in (args.hook, args.target_hook) if h),
            arch="topk",
            k=args.k,
            expansion=args.expansion,
            tokens=args.tokens,
            wandb=args.wandb,
            resume=(run / "sae" / "checkpoint.safetensors").exists(),
        )
    )


def build_graph(args: argparse.Namespace, run: Path) -> str:
    """stats/, graph/ and (with --target-hook) transition/; returns the transition dir or ""."""
    sae_dir = run / "sae" / args.hook
    stats = StatsConfig(store=str(run / "store"), sae=str(sae_dir), out=str(run / "stats"))
    coactivation_stats(stats)
    if not (run / "graph" / "graph.json").exists():
        train_graph(
            GraphTrainConfig(
                store=str(run / "store"),
                stats=str(run / "stats"),
                out=str(run / "graph"),
                tokens=args.tokens // 2,
                wandb=args.wandb,
                resume=(run / "graph" / "checkpoint.safetensors").exists(),
            )
        )
    if not args.target_hook:
        return ""
    transition = run / "transition"
    if not (transition / "transition.json").exists():
        fit_transition(
            TransitionConfig(
                store=str(run / "store"),
                source=str(run / "graph"),
                target=str(run / "sae" / args.target_hook),
                out=str(transition),
            )
        )
    return str(transition)


def main() -> None:
    args = parse_args()
    run = Path(args.out)
    model = load_model(args.model, args.device, args.dtype)
    harvest_stores(args, run, model)
    train_saes(args, run)
    transition = build_graph(args, run)
    release = export_release(
        ExportConfig(
            sae=str(run / "sae" / args.hook),
            graph=str(run / "graph"),
            store=str(run / "heldout"),
            stats=str(run / "stats"),
            transition=transition,
            out=str(run / "release"),
            model=args.model,
            device=args.device,
            dtype=args.dtype,
        ),
        model,
    )
    dashboard = release / "dashboard" / "index.html"
    print(
        json.dumps(
            {"release": str(release.resolve()), "dashboard": str(dashboard.resolve())}, indent=2
        )
    )


if __name__ == "__main__":
    main()
