"""SAE quality table on SmolLM2: FVU, L0, CE loss recovered and dead fraction per architecture.

Trains one SAE per architecture on the same store (resumable: re-run after a kill), evaluates each
on held-out activations (FVU, L0, dead/dense) and by splicing into the model on held-out text (CE
loss recovered, ΔCE, KL), and writes a markdown report
(out/sae_quality.md; docs/saes.md quotes its table) plus a JSON beside the runs. Every trained SAE
and evaluation is cached under --out keyed by a hash of the configuration that made it
(scripts/_cache.py), and the report quotes the command(s) that actually produced its figures.

    python scripts/sae_quality.py --store out/l15-train-1m --eval-store out/l15-heldout

JumpReLU and ReLU-L1 at the same L0 as TopK k=32 (the controller and fixes in sae/sparsity.py):

    ... --target-l0 32 --threshold-lr-scale 10 --dense-aux --reopen-dead
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _cache import RECORD, cached_json, content_digest, keyed, produced_by, record  # noqa: E402

from sae.evaluate import heldout_windows, reconstruction_metrics, splice_metrics  # noqa: E402
from sae.io import load_sae  # noqa: E402
from sae.models import load_model  # noqa: E402
from sae.store import ActivationStore  # noqa: E402
from sae.train import TrainConfig, train  # noqa: E402

COLUMNS = (
    "arch",
    "k / λ",
    "L0",
    "FVU",
    "explained var.",
    "CE loss recovered",
    "ΔCE (nats)",
    "KL",
    "dead",
    "dense",
)


def train_arch(args, arch: str, coeff: float) -> Path:
    """The SAE of `arch` trained on args' settings: reused when one was trained on exactly this
    configuration (the directory name carries its hash), else trained (resuming a killed run)."""
    dense = arch in ("jumprelu", "relu")  # the L0 controller and dense AuxK apply to these two only
    cfg = TrainConfig(
        store=args.store,
        out="",
        hooks=args.hook,
        arch=arch,
        k=args.k,
        expansion=args.expansion,
        tokens=args.tokens,
        batch_size=args.batch,
        sparsity_coeff=coeff,
        checkpoint_every=25,
        dead_tokens=args.dead_tokens,
        target_l0=args.target_l0 if dense else 0.0,
        dense_aux=args.dense_aux and dense,
        threshold_lr_scale=args.threshold_lr_scale,
        jumprelu_bandwidth=args.jumprelu_bandwidth,
        reopen_dead=args.reopen_dead,
        optimizer=args.optimizer,
    )
    key = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("checkpoint_every",)}
    key["store_digest"] = content_digest(args.store)
    out = keyed(args.out, arch, key)
    if not ((out / args.hook / "sae.safetensors").exists() and (out / RECORD).exists()):
        cfg.out, cfg.resume = str(out), (out / "checkpoint.safetensors").exists()
        train(cfg)
        record(out, key)
    latest_link(Path(args.out) / arch, out)
    return out / args.hook


def latest_link(link: Path, target: Path) -> None:
    """`<out>/<arch>` -> the keyed directory this run used, so the stable path other commands take
    (`--sae out/quality/topk/blocks.15.hook_resid_post`) names the SAE of the latest table."""
    if link.exists() and not link.is_symlink():
        raise FileExistsError(
            f"{link} is a directory from before caches were keyed by configuration; move it away "
            "(its SAE is not reused: nothing records the configuration that made it)"
        )
    tmp = link.with_name(link.name + ".tmp-link")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.name)
    tmp.replace(link)  # atomic: the link never points nowhere


def setting(args, arch: str, coeff: float, sae_dir: Path) -> str:
    """The table's "k / λ" cell: k for the TopK family, else λ (the controller's final λ with a
    target)."""
    if arch in ("topk", "batchtopk", "matryoshka"):
        return f"k={args.k}"
    if args.target_l0:
        final = json.loads((sae_dir / "cfg.json").read_text()).get("sparsity_coeff", 0.0)
        return f"target L0 {args.target_l0:g} (final λ_I={final:.3g})"
    return f"λ={coeff or 'default'}"


def evaluate(args, model, sae_dir: Path, windows) -> dict:
    """Metrics of one trained SAE, cached beside it keyed by the SAE and the evaluation settings
    (a re-run after a kill does not redo them; other settings do). "_command" holds the command
    that computed them."""

    def compute() -> dict:
        sae = load_sae(sae_dir)
        result = reconstruction_metrics(sae, ActivationStore(args.eval_store))
        result.update(splice_metrics(model, sae, windows))
        return result

    key = {"sae": str(sae_dir), "eval_store": content_digest(args.eval_store)}
    key["ce_tokens"] = args.ce_tokens
    return cached_json(sae_dir.parent, "quality_eval", {**key, "model": args.model}, compute)


def markdown(rows: list[dict], args) -> str:
    """The report; its "Produced by" block quotes the commands that trained and evaluated the rows
    (a row reused from the cache keeps the command that made it)."""
    made_by = list(dict.fromkeys(c for r in rows for c in (r["trained_by"], r["_command"])))
    lines = [
        f"# SAE quality on {args.model}, `{args.hook}`",
        "",
        f"Width {args.expansion}× ({rows[0]['n_latents']} latents), {args.tokens:,} training "
        f"tokens (batch {args.batch}), default corpus train split; metrics on held-out documents: "
        f"reconstruction over `{args.eval_store}`, CE/KL from splicing the SAE into the model on "
        f"{args.ce_tokens:,} held-out tokens (BOS left clean). Definitions: `sae/metrics.py`. "
        "Dead: never fired on the held-out set; dense: fires on > 10% of held-out tokens.",
        "",
        "Produced by:" if len(made_by) == 1 else "Produced by (cached rows keep their command):",
        "",
        "```bash",
        *made_by,
        "```",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        cells = [
            r["arch"],
            r["setting"],
            f"{r['l0']:.1f}",
            f"{r['fvu']:.3f}",
            f"{r['explained_variance']:.3f}",
            f"{r['ce_loss_recovered']:.3f}",
            f"{r['delta_ce']:.3f}",
            f"{r['kl_spliced']:.3f}",
            f"{r['dead_fraction']:.3f}",
            f"{r['dense_fraction']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    clean = rows[0]
    lines += [
        "",
        f"Clean CE {clean['ce_clean']:.3f} nats; "
        f"zero-ablated CE {clean['ce_zero_ablated']:.3f} nats.",
    ]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m", help="the model the stores came from")
    parser.add_argument("--hook", default="blocks.15.hook_resid_post")
    parser.add_argument("--store", default="out/l15-train-1m")
    parser.add_argument("--eval-store", default="out/l15-heldout")
    parser.add_argument("--out", default="out/quality")
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--dead-tokens", type=int, default=200_000)
    parser.add_argument("--archs", default="topk,batchtopk,jumprelu,relu")
    parser.add_argument(
        "--optimizer",
        default="auto",
        choices=["auto", "adam", "schedulefree"],
        help="auto: schedule-free for topk, Adam for the others",
    )
    parser.add_argument(
        "--jumprelu-coeff", type=float, default=0.0, help="λ for the L0 term (0: default)"
    )
    parser.add_argument(
        "--relu-coeff", type=float, default=0.0, help="λ for the L1 term (0: default)"
    )
    parser.add_argument(
        "--target-l0",
        type=float,
        default=0.0,
        help="jumprelu/relu: adapt λ to hold this L0 (0: fixed λ); see TrainConfig.target_l0",
    )
    parser.add_argument(
        "--threshold-lr-scale", type=float, default=1.0, help="jumprelu: LR multiplier of log θ"
    )
    parser.add_argument(
        "--jumprelu-bandwidth",
        type=float,
        default=0.05,
        help="jumprelu: straight-through kernel width",
    )
    parser.add_argument(
        "--dense-aux", action="store_true", help="AuxK for jumprelu/relu dead latents too"
    )
    parser.add_argument(
        "--reopen-dead",
        action="store_true",
        help="jumprelu: dead latents' θ back at the k/n quantile",
    )
    parser.add_argument("--ce-tokens", type=int, default=16_384)
    parser.add_argument("--doc", default="out/sae_quality.md")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    model = load_model(args.model)
    windows = heldout_windows(model, args.ce_tokens)
    rows = []
    for arch in args.archs.split(","):
        coeff = {"jumprelu": args.jumprelu_coeff, "relu": args.relu_coeff}.get(arch, 0.0)
        sae_dir = train_arch(args, arch, coeff)
        result = evaluate(args, model, sae_dir, windows)
        n_latents = json.loads((sae_dir / "cfg.json").read_text())["n_latents"]
        rows.append(
            {
                "arch": arch,
                "setting": setting(args, arch, coeff, sae_dir),
                "n_latents": n_latents,
                "trained_by": produced_by(sae_dir.parent),
                **result,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out, "quality.json").write_text(json.dumps(rows, indent=2))
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc).write_text(markdown(rows, args))
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
