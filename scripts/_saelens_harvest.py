"""Cache activations with SAELens's CacheActivationsRunner, for a speed comparison with greylens.

Runs INSIDE the side venv (/root/.cache/greylens/venvs/saelens: sae-lens + transformer-lens 3.x),
never in greylens's own venv, whose transformer-lens 4 sae-lens refuses. Fully offline, CPU, fp32.

    python _saelens_harvest.py --model-dir DIR --text-file F --tokens N --context-size C \
        --batch B --out DIR [--hook blocks.15.hook_resid_post] [--repeats R]

--model-dir is an HF-format Llama checkpoint (config.json, model.safetensors, tokenizer files);
--text-file holds one document per line; --out must be missing or empty. One warm process: the
model and runner are built once (startup_s, reported apart), then `runner.run()` caches the
activations --repeats times (emptying --out in between, untimed), each in fp32 (SAELens caches in
its compute dtype). Prints one JSON line on stdout: tokens cached per run, the best run's seconds
and tokens/s, every run's tokens/s, startup_s and the sae-lens / transformer-lens versions.
Everything else (progress bars, warnings) goes to stderr.

How SAELens is made to work offline on a model it does not know:
- TransformerLens 3 has no SmolLM2 entry, and `HookedTransformer.from_pretrained` looks every name
  up in `OFFICIAL_MODEL_NAMES` even though its config/weight loaders accept a local directory.
  Registering the directory itself as an official name lets those local-path branches run.
- SAELens loads the model itself through `from_pretrained_no_processing(model_name, **kwargs)`
  (raw weights: no LayerNorm folding, no centering); `model_from_pretrained_kwargs` hands it the HF
  model and tokenizer we loaded from disk.
- The checkpoint's config.json still names the GGUF it was dequantized from; TransformerLens
  refuses any quantized `hf_model`, so the stale `quantization_config` is dropped before loading.
- The text goes in as an in-memory `datasets.Dataset` through the runner's `override_dataset`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from importlib.metadata import version
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # set before transformers/datasets are imported
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

MAX_BUFFER_BYTES = 500_000_000  # SAELens writes one arrow shard per buffer; keep each well < 2 GB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--text-file", type=Path, required=True, help="one document per line")
    p.add_argument("--tokens", type=int, required=True, help="rounded up to whole batches")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--out", type=Path, required=True, help="missing or empty directory")
    p.add_argument("--hook", default="blocks.15.hook_resid_post")
    p.add_argument("--repeats", type=int, default=1, help="timed runs in this one warm process")
    return p.parse_args(argv)


def load_hf(model_dir: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """The raw fp32 HF model and tokenizer, read from disk only."""
    config = AutoConfig.from_pretrained(model_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights on disk are already dequantized fp32
    hf = LlamaForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32)
    return hf.eval(), AutoTokenizer.from_pretrained(model_dir)


def buffer_size_gb(n_tokens: int, tokens_per_batch: int, bytes_per_token: int) -> float:
    """A buffer size holding whole batches, so SAELens caches about `n_tokens` and not far more.

    SAELens derives tokens-per-buffer as int(gb * 1e9) // bytes_per_token, rounded down to whole
    batches, and always fills ceil(training_tokens / tokens_per_buffer) whole buffers (its 2 GB
    default would cache ~870k tokens for a 20k request). Buffers are split evenly, so the overshoot
    is under one batch per buffer; half a token of slack keeps float rounding from losing a batch.
    """
    n_batches = -(-n_tokens // tokens_per_batch)
    max_batches = max(1, MAX_BUFFER_BYTES // (bytes_per_token * tokens_per_batch))
    n_buffers = -(-n_batches // max_batches)
    batches_per_buffer = -(-n_batches // n_buffers)
    return (batches_per_buffer * tokens_per_batch + 0.5) * bytes_per_token / 1e9


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    docs = [line.strip() for line in args.text_file.read_text().splitlines() if line.strip()]
    if not docs:
        sys.exit(f"{args.text_file} has no text")
    tokens_per_batch = args.batch * args.context_size
    n_tokens = -(-args.tokens // tokens_per_batch) * tokens_per_batch

    # TransformerLens prints to stdout; keep stdout for the one JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        import transformer_lens.loading_from_pretrained as tl_loading
        from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

        model_name = str(args.model_dir.resolve())
        if model_name not in tl_loading.OFFICIAL_MODEL_NAMES:
            tl_loading.OFFICIAL_MODEL_NAMES.append(model_name)

        t0 = time.perf_counter()
        hf, tokenizer = load_hf(args.model_dir)
        d_in = hf.config.hidden_size
        cfg = CacheActivationsRunnerConfig(
            dataset_path=str(args.text_file),  # only a label: the data comes from override_dataset
            model_name=model_name,
            model_class_name="HookedTransformer",
            model_from_pretrained_kwargs={"hf_model": hf, "tokenizer": tokenizer},
            hook_name=args.hook,
            d_in=d_in,
            context_size=args.context_size,
            model_batch_size=args.batch,
            training_tokens=n_tokens,
            buffer_size_gb=buffer_size_gb(n_tokens, tokens_per_batch, d_in * 4),
            new_cached_activations_path=str(args.out),
            device="cpu",
            dtype="float32",
            prepend_bos=True,
            shuffle=False,
        )
        runner = CacheActivationsRunner(cfg, override_dataset=Dataset.from_dict({"text": docs}))
        startup_seconds = time.perf_counter() - t0

        runs = []  # (tokens cached, seconds) per repeat
        for _ in range(args.repeats):
            shutil.rmtree(args.out, ignore_errors=True)  # run() refuses a non-empty directory
            t0 = time.perf_counter()
            cached = runner.run()
            runs.append((len(cached) * args.context_size, time.perf_counter() - t0))

    n_cached, seconds = min(runs, key=lambda run: run[1])
    print(
        json.dumps(
            {
                "tokens": n_cached,
                "dtype": "float32",
                "seconds": round(seconds, 3),
                "tok_per_s": round(n_cached / seconds, 1),
                "tok_per_s_runs": [round(n / s, 1) for n, s in runs],
                "startup_s": round(startup_seconds, 3),
                "sae_lens_version": version("sae-lens"),
                "transformer_lens_version": version("transformer-lens"),
            }
        )
    )


if __name__ == "__main__":
    main()
