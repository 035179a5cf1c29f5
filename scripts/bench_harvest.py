"""Harvest benchmark on SmolLM2 (prints JSON). Every figure is measured in this one run.

- full_forward: the whole model (TransformerLens bridge, logits included) over the same windows;
- harvest: `sae.harvest` with one hook at layer 15 (early exit), shard writes included, storing
  fp32 (as SAELens does; `harvest_fp16_tok_s` is the default fp16 store, reported apart);
- saelens: SAELens's CacheActivationsRunner on the same tokens, context and batch, run in a side
  venv (sae-lens needs transformer-lens < 4); skipped with a reason if it can't run.

Like with like: --tokens is rounded up to whole batches (SAELens caches whole batches), both sides
must report that same token count (checked), both store fp32, and both are timed warm, best of
--repeats in one process each; SAELens's start-up (model load, runner construction) is reported
apart as saelens.startup_s.

    python scripts/bench_harvest.py [--tokens 16384] [--no-saelens] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sae.corpus import load_corpus
from sae.harvest import HarvestConfig, corpus_windows, harvest
from sae.models import cache_root, load_model

HOOK = "blocks.15.hook_resid_post"
SAELENS_VENV = cache_root() / "venvs" / "saelens"
SAELENS_DRIVER = Path(__file__).with_name("_saelens_harvest.py")
# what `pip install sae-lens` gave here
SAELENS_PINS = ("sae-lens==6.54.12", "transformer-lens==3.9.0")


def full_forward_tok_s(model, windows, batch_size: int) -> float:
    """Tokens/s of a complete forward (all 30 blocks + logits) over the harvest's windows."""
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            model.bridge(windows.tokens[i : i + batch_size], return_type="logits")
    return windows.tokens.numel() / (time.perf_counter() - started)


def harvest_tok_s(model, cfg: HarvestConfig) -> tuple[float, int]:
    """(tokens/s, tokens) of the harvest itself (corpus windows, forward, shard writes), counting
    every window token the model processed, BOS included, as the full forward and SAELens do."""
    started = time.perf_counter()
    store = harvest(cfg, model)
    seconds = time.perf_counter() - started
    tokens = len(store) // cfg.rows_per_window * cfg.context_size
    return tokens / seconds, tokens


def ensure_saelens_venv() -> Path:
    """Create the side venv once: CPU torch pinned first, then sae-lens (which pins
    transformer-lens 3)."""
    python = SAELENS_VENV / "bin" / "python"
    if python.exists():
        return python
    pin = Path(tempfile.mkdtemp()) / "constraints.txt"
    pin.write_text("torch==2.13.0\n")
    steps = [
        [sys.executable, "-m", "venv", str(SAELENS_VENV)],
        [str(python), "-m", "pip", "install", "-q", "torch==2.13.0"],
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "-c",
            str(pin),
            SAELENS_PINS[0],
            SAELENS_PINS[1],
        ],
    ]
    for step in steps:
        subprocess.run(step, check=True)
    return python


def saelens_tok_s(model, cfg: HarvestConfig, repeats: int) -> dict:
    """Run SAELens's activation cache runner on the same documents, token budget and batch,
    `repeats` timed runs in one warm process."""
    try:
        python = ensure_saelens_venv()
    except subprocess.CalledProcessError as error:
        return {"skipped": f"could not build the SAELens venv: {error}"}
    text_file = Path(tempfile.mkdtemp()) / "docs.txt"
    docs = load_corpus(cfg.corpus, split="train")
    text_file.write_text("\n".join(t.replace("\n", " ") for t in docs["text"]))
    with tempfile.TemporaryDirectory() as out:
        command = [
            str(python),
            str(SAELENS_DRIVER),
            "--model-dir",
            str(model.hf.name_or_path),
            "--text-file",
            str(text_file),
            "--tokens",
            str(cfg.tokens),
            "--context-size",
            str(cfg.context_size),
            "--batch",
            str(cfg.batch_size),
            "--hook",
            cfg.hooks,
            "--repeats",
            str(repeats),
            "--out",
            out,
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return {"skipped": f"SAELens run failed: {result.stderr.strip()[-600:]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=16_384)
    parser.add_argument("--no-saelens", action="store_true")
    parser.add_argument("--model", default="smollm2-135m", help="an HF-directory model for SAELens")
    parser.add_argument("--hook", default=HOOK)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument(
        "--repeats", type=int, default=2, help="best of N runs (the machine is shared)"
    )
    args = parser.parse_args()
    per_batch = HarvestConfig.batch_size * args.context_size
    args.tokens = -(-args.tokens // per_batch) * per_batch  # whole batches, as SAELens caches

    model = load_model(args.model)
    cfg = HarvestConfig(
        model=args.model,
        hooks=args.hook,
        # stored rows (BOS dropped) of exactly the windows SAELens caches whole
        tokens=args.tokens // args.context_size * (args.context_size - 1),
        context_size=args.context_size,
        store_dtype="float32",  # what SAELens stores
    )
    result = {
        "model": args.model,
        "hook": args.hook,
        "tokens": args.tokens,
        "context_size": cfg.context_size,
        "batch_size": cfg.batch_size,
        "store_dtype": cfg.store_dtype,
        "torch_threads": torch.get_num_threads(),
        **greylens_speeds(model, cfg, args.repeats),
    }
    if not args.no_saelens:
        saelens = saelens_tok_s(model, cfg, args.repeats)
        result["saelens"] = saelens
        if "tok_per_s" in saelens:
            if saelens["tokens"] != result["harvest_tokens"]:
                raise RuntimeError(
                    f"SAELens cached {saelens['tokens']} tokens and greylens harvested "
                    f"{result['harvest_tokens']}: the comparison would not be like for like"
                )
            result["harvest_over_saelens"] = round(
                result["harvest_tok_s"] / saelens["tok_per_s"], 2
            )
    print(json.dumps(result, indent=2))


def greylens_speeds(model, cfg: HarvestConfig, repeats: int) -> dict:
    """Best-of-`repeats` tokens/s of the full forward, the fp32 harvest and the default fp16
    harvest, all in this warm process (one untimed forward first)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg.out = f"{tmp}/store"
        windows = corpus_windows(cfg, model)
        with torch.inference_mode():  # warm-up: first-call allocations stay out of the timing
            model.bridge(windows.tokens[: cfg.batch_size], return_type="logits")
        full = max(full_forward_tok_s(model, windows, cfg.batch_size) for _ in range(repeats))
        speeds = {}
        for dtype in ("float32", "float16"):
            runs = []
            for repeat in range(repeats):
                run_cfg = dataclasses.replace(cfg, out=f"{tmp}/{dtype}-{repeat}", store_dtype=dtype)
                runs.append(harvest_tok_s(model, run_cfg))
            speeds[dtype] = max(runs)
    tok_s, tokens = speeds["float32"]
    return {
        "harvest_tokens": tokens,
        "full_forward_tok_s": round(full, 1),
        "harvest_tok_s": round(tok_s, 1),
        "harvest_fp16_tok_s": round(speeds["float16"][0], 1),
        "harvest_over_full_forward": round(tok_s / full, 2),
    }


if __name__ == "__main__":
    main()
