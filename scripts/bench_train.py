"""SAE training benchmark (prints JSON): greylens vs SAELens vs EleutherAI sparsify, one run.

All three train a TopK SAE on the same SmolLM2 activations (a store from `python -m sae harvest`)
with the same width, k, batch and tokens, and are scored by the same FVU (sae.metrics.fvu) on the
same held-out activations (massive-activation rows, > 10x the median norm, dropped from all
data: see inlier_rows). SAELens and sparsify run in side venvs (sae-lens pins transformer-lens
< 4) through scripts/_saelens_train.py and scripts/_sparsify_train.py. All three are timed by the
same clock (`_side_driver.StepClock`): set-up (SAE/trainer construction through the end of step 0)
is reported apart as setup_s, and speed is the steady state, steps 1 .. N-2 (data loading
included; imports and evaluation excluded), as tokens/s. At least 3 steps are needed.

Efficiency: greylens's achieved FLOP/s divided by a torch fp32 GEMM of the encoder's shape measured
in this run. FLOPs counted are those greylens executes per token: the dense encoder GEMM 2·d·n
plus the sparse parts (decode 2·k·d; backward of decoder and encoder 4·k·d each); AuxK's work is
not counted. The headline ratio is like for like on a shared, noisy machine: every 5th training
step is followed by one timed GEMM (into a reused buffer, as the trainer does), and the ratio
compares the median step (data loading included) with the median GEMM. The ratios against the
best of 5 GEMMs after training (a quiet-moment peak, against the run's mean tok/s) are printed too.

    python scripts/bench_train.py --store out/l15-train-1m --eval-store out/l15-heldout \
        [--tokens 204800]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from _side_driver import StepClock  # noqa: E402

from sae.config import TrainConfig, base_lr, optimizer_name  # noqa: E402
from sae.io import load_sae  # noqa: E402
from sae.metrics import fvu  # noqa: E402
from sae.models import cache_root  # noqa: E402
from sae.optim import default_lr  # noqa: E402
from sae.store import DTYPES, ActivationStore, StoreManifest, StoreWriter  # noqa: E402
from sae.train import train  # noqa: E402

HOOK = "blocks.15.hook_resid_post"  # the default of --hook
SCRIPTS = Path(__file__).parent
VENVS = cache_root() / "venvs"
SIDE_VENVS = {  # library -> (venv dir, pip requirements after CPU torch)
    "saelens": (VENVS / "saelens", ["sae-lens==6.54.12", "transformer-lens==3.9.0"]),
    "sparsify": (VENVS / "sparsify", ["eai-sparsify==1.3.3"]),
}


def gemm_flops(batch: int, d: int, n: int, repeats: int = 5, fresh_output: bool = False) -> float:
    """Best fp32 GEMM FLOP/s for [batch, d] @ [d, n] on this machine, now. By default the output
    buffer is reused (as greylens's trainer does); `a @ b` with a fresh 151 MB output per call adds
    page faults and measures ~15-25% lower, a softer baseline (fresh_output=True, reported too)."""
    a, b, out = torch.randn(batch, d), torch.randn(d, n), torch.empty(batch, n)
    gemm = (lambda: a @ b) if fresh_output else (lambda: torch.mm(a, b, out=out))
    gemm()
    best = min(_timed(gemm) for _ in range(repeats))
    return 2 * batch * d * n / best


class GemmProbe:
    """on_step callback for sae.train.train: ticks the shared StepClock at the end of every step
    and, after every `every`-th step, times one GEMM of the encoder's shape right there (outside
    the step intervals), so that both are measured in the same state of the machine."""

    def __init__(self, clock: StepClock, d: int, n: int, every: int = 5) -> None:
        batch = clock.batch
        self.a, self.b, self.out = torch.randn(batch, d), torch.randn(d, n), torch.empty(batch, n)
        self.clock, self.every, self.gemm_s = clock, every, []

    def __call__(self, step: int) -> None:
        if step % self.every == self.every - 1:
            self.clock.tick(lambda: self.gemm_s.append(_timed(self._gemm)))
        else:
            self.clock.tick()

    def _gemm(self) -> None:
        torch.mm(self.a, self.b, out=self.out)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def inlier_rows(store: ActivationStore, n_rows: int, hook: str) -> torch.Tensor:
    """Indices of the first n_rows rows whose norm is within 10x the median (no massive
    activations).

    greylens passes massive activations through its SAE untouched; SAELens and sparsify would have
    to reconstruct them. Dropping them from every library's train and eval data keeps the
    comparison about the same inputs.
    """
    candidates = torch.arange(min(int(n_rows * 1.01) + 64, len(store)))
    norms = store.rows(candidates, hooks=[hook])[hook].norm(dim=1)
    return candidates[norms <= 10 * norms.median()][:n_rows]


def export_rows(store: ActivationStore, index: torch.Tensor, path: Path, hook: str) -> Path:
    x = store.rows(index, hooks=[hook])[hook]  # [n, d] float32
    save_file({"x": x.contiguous()}, path)
    return path


def subset_store(store: ActivationStore, index: torch.Tensor, directory: Path) -> ActivationStore:
    """A one-shard store holding exactly the rows the side drivers get (the same activations)."""
    rows = store.rows(index)
    manifest = StoreManifest(
        **{**store.manifest.identity(), "n_tokens_target": len(rows["token_ids"])}
    )
    writer = StoreWriter.open(directory, manifest)
    writer.write_shard(
        {k: (v.to(DTYPES[manifest.dtype]) if k in store.hooks else v) for k, v in rows.items()}
    )
    writer.finish()
    return ActivationStore(directory)


def run_greylens(args, work: Path, eval_x: torch.Tensor) -> dict:
    train_store = subset_store(ActivationStore(args.store), args.train_index, work / "train-store")
    cfg = TrainConfig(
        store=str(train_store.directory),
        out=str(work / "greylens"),
        hooks=args.hook,
        arch="topk",
        k=args.k,
        expansion=args.expansion,
        tokens=args.tokens,
        batch_size=args.batch,
        lr=args.lr,
        optimizer=args.optimizer,
        wandb="disabled",
        checkpoint_every=10**9,
        log_every=10**9,
        seed=0,
        **({"dead_tokens": args.dead_tokens} if args.dead_tokens else {}),
    )
    clock = StepClock(args.batch)
    every = max(1, min(5, args.tokens // args.batch // 2))  # short runs get GEMM probes too
    probe = GemmProbe(clock, eval_x.shape[1], args.expansion * eval_x.shape[1], every)
    clock.start()
    train(cfg, on_step=probe)
    last = json.loads((work / "greylens" / "metrics.jsonl").read_text().splitlines()[-1])
    sae = load_sae(work / "greylens" / args.hook)
    with torch.no_grad():
        recons = sae(eval_x)
        fired = torch.bincount(sae.encode(eval_x).cols, minlength=sae.cfg.n_latents) > 0
    return {
        "library": "greylens",
        **clock.report(len(clock.ends)),  # the GEMM probes are outside the step intervals
        "tokens": last["tokens"],
        "eval_fvu": fvu(eval_x, recons),
        "eval_dead_fraction": 1 - fired.float().mean().item(),
        "lr": base_lr(cfg, sae.cfg.n_latents),
        "optimizer": optimizer_name(cfg),
        "median_gemm_s": _median(probe.gemm_s),
        "gemms_timed": len(probe.gemm_s),
    }


def ensure_venv(library: str) -> Path:
    venv, requirements = SIDE_VENVS[library]
    python = venv / "bin" / "python"
    if not python.exists():
        pin = Path(tempfile.mkdtemp()) / "constraints.txt"
        pin.write_text("torch==2.13.0\n")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "-c", str(pin), *requirements], check=True
        )
    return python


def side_lr(library: str, args, d: int) -> float:
    """SAELens (Adam) gets greylens's default Adam LR (or --lr); sparsify keeps its own default
    signum LR (its driver multiplies an Adam-style LR by 25, so pass sparsify's Adam default
    2e-4/sqrt(n/2^14))."""
    n_latents = args.expansion * d
    if library == "sparsify":
        return 2e-4 / math.sqrt(n_latents / 16384)
    return args.lr or default_lr(n_latents, "adam")


def run_side(
    library: str, args, train_file: Path, eval_file: Path, eval_x: torch.Tensor, work: Path
) -> dict:
    try:
        python = ensure_venv(library)
    except subprocess.CalledProcessError as error:
        return {"library": library, "skipped": f"could not build its venv: {error}"}
    out = work / f"{library}.safetensors"
    command = [
        str(python),
        str(SCRIPTS / f"_{library}_train.py"),
        "--train",
        str(train_file),
        "--eval",
        str(eval_file),
        "--n-latents",
        str(args.expansion * eval_x.shape[1]),
        "--k",
        str(args.k),
        "--batch",
        str(args.batch),
        "--tokens",
        str(args.tokens),
        "--lr",
        str(side_lr(library, args, eval_x.shape[1])),
        "--seed",
        "0",
        "--out",
        str(out),
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"},
    )
    if result.returncode != 0:
        return {"library": library, "skipped": f"run failed: {result.stderr.strip()[-800:]}"}
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["eval_fvu"] = fvu(eval_x, load_file(out)["recons"])
    return report


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", default="out/l15-train-1m")
    parser.add_argument("--eval-store", default="out/l15-heldout")
    parser.add_argument("--hook", default=HOOK)
    parser.add_argument("--eval-tokens", type=int, default=32_768, help="held-out rows scored")
    parser.add_argument("--tokens", type=int, default=204_800)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument(
        "--lr", type=float, default=0.0, help="LR for greylens and SAELens (0: each one's default)"
    )
    parser.add_argument(
        "--optimizer",
        default="auto",
        choices=["auto", "adam", "schedulefree"],
        help="greylens's optimizer",
    )
    parser.add_argument(
        "--dead-tokens", type=int, default=0, help="greylens's AuxK dead window (0: its default)"
    )
    parser.add_argument("--only", default="greylens,saelens,sparsify")
    return parser.parse_args()


def efficiency(args: argparse.Namespace, results: dict, d: int, peaks: tuple[float, float]) -> dict:
    """greylens's achieved FLOP/s against the GEMM's (see the module docstring), and its speed
    against the other libraries'."""
    ours, (peak, peak_fresh) = results["greylens"], peaks
    n_latents = args.expansion * d
    executed_per_token = 2 * d * n_latents + 10 * args.k * d
    achieved = ours["tok_per_s"] * executed_per_token
    step_flops = args.batch * executed_per_token
    gemm_flops_per_call = 2 * args.batch * d * n_latents
    median_ratio = step_flops / ours["median_step_s"] * ours["median_gemm_s"] / gemm_flops_per_call
    summary = {
        "greylens_gflops": round(achieved / 1e9, 1),
        "gemm_flops_interleaved": round(gemm_flops_per_call / ours["median_gemm_s"] / 1e9, 1),
        "greylens_flops_over_gemm": round(median_ratio, 2),
        "greylens_flops_over_gemm_peak": round(achieved / peak, 2),
        "greylens_flops_over_gemm_peak_fresh_output": round(achieved / peak_fresh, 2),
    }
    for library in ("saelens", "sparsify"):
        if "tok_per_s" in results.get(library, {}):
            speedup = ours["tok_per_s"] / results[library]["tok_per_s"]
            summary[f"greylens_over_{library}"] = round(speedup, 2)
    return summary


def main() -> None:
    args = parse_args()
    store, eval_store = ActivationStore(args.store), ActivationStore(args.eval_store)
    d = store.d_model
    n_latents = args.expansion * d
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        args.train_index = inlier_rows(store, args.tokens, args.hook)
        train_file = export_rows(store, args.train_index, work / "train.safetensors", args.hook)
        eval_index = inlier_rows(eval_store, args.eval_tokens, args.hook)
        eval_file = export_rows(eval_store, eval_index, work / "eval.safetensors", args.hook)
        eval_x = load_file(eval_file)["x"]
        for library in args.only.split(","):
            if library == "greylens":
                results[library] = run_greylens(args, work, eval_x)
            else:
                results[library] = run_side(library, args, train_file, eval_file, eval_x, work)
        peak = gemm_flops(args.batch, d, n_latents)
        peak_fresh = gemm_flops(args.batch, d, n_latents, fresh_output=True)
    summary = {
        "activations": f"{store.manifest.model} {args.hook}",
        "d_model": d,
        "n_latents": n_latents,
        "k": args.k,
        "batch": args.batch,
        "tokens": args.tokens,
        "torch_threads": torch.get_num_threads(),
        "gemm_flops": round(peak / 1e9, 1),
        "gemm_flops_fresh_output": round(peak_fresh / 1e9, 1),
        "results": results,
    }
    if "tok_per_s" in results.get("greylens", {}):
        summary.update(efficiency(args, results, d, (peak, peak_fresh)))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
