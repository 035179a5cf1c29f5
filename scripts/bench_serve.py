"""Serving benchmarks for the engine (JSON on stdout; figures go in docs/benchmarks.md).

    python scripts/bench_serve.py [--only poisson,hf,prefix,long,vllm,load] [--model smollm2-135m]

- poisson  Poisson arrivals at several rates (vLLM's `bench serve` method): TTFT, TPOT, output
           throughput, and goodput (requests/s meeting TTFT ≤ --slo-ttft and TPOT ≤ --slo-tpot).
- hf       the same requests, all at once, through transformers `generate` in static batches
           (left-padded, each batch runs to its longest request) vs the engine: useful output
           tokens/s ratio. Both warm (one untimed run each) and both on torch SDPA attention.
- prefix   many requests behind one long system prompt, one at a time: mean TTFT with the prefix
           cache on ÷ off.
- long     short prompts, long outputs: the fraction of allocated KV slots that hold live tokens
           (sampled every step), and how many requests ran at once vs how many a contiguous
           per-request allocation of the same memory would hold.
- vllm     16 prompts × 64 tokens through greylens's HTTP server and vLLM's CPU server (side venv,
           `scripts/_vllm_side.py setup`) in compiled and in eager mode, same client and cores,
           all warm, alternated over --vllm-rounds rounds: medians with min/max, and ratios.
- load     1000 Poisson requests with a deliberately small block pool vs a roomy one: requests
           lost (submitted but not completed with their requested token count) and outputs that
           differ.

    python scripts/bench_serve.py --hooks --sae out/quality/topk/blocks.15.hook_resid_post

- hooks_poisson  the poisson workload (--hook-rate) and the same requests all at once, with a
           FeatureHook (the SAE + four probes, every request watched) ÷ without: output
           throughput, TTFT and TPOT ratios; rounds alternate off/on.
- hooks_prefix   the prefix workload with hooks on and off: TTFT ratio, and the fraction of
           prefix-cache hit tokens whose features came from feature pages (not recomputed).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _vllm_side  # noqa: E402
from _serve_load import VOCAB, run_arrivals, summarize, warm, workload  # noqa: E402

from serve_hooks.config import EngineConfig  # noqa: E402
from serve_hooks.engine import LLMEngine  # noqa: E402


def bench_poisson(model, args) -> dict:
    out = {"slo": {"ttft_s": args.slo_ttft, "tpot_ms": 1000 * args.slo_tpot}}
    for rate in args.rates:
        requests = workload(args.n, seed=1, out_len=(16, 64))
        rng = random.Random(2)
        arrivals, t = [], 0.0
        for _ in requests:
            t += rng.expovariate(rate)
            arrivals.append(t)
        engine = LLMEngine(EngineConfig(model=args.model, max_num_batched_tokens=256), model)
        warm(engine)
        out[f"rate_{rate}"] = summarize(
            run_arrivals(engine, requests, arrivals), args.slo_ttft, args.slo_tpot
        )
        print(json.dumps({f"poisson {rate}/s": out[f"rate_{rate}"]}), file=sys.stderr)
    return out


def bench_hf(model, args) -> dict:
    requests = workload(args.n, seed=3, out_len=(16, 128))
    engine = LLMEngine(EngineConfig(model=args.model, max_num_batched_tokens=256), model)
    warm(engine)
    rows = run_arrivals(engine, requests, [0.0] * len(requests))
    engine_tps = sum(len(r["tokens"]) for r in rows) / max(r["end"] for r in rows)
    # HF on the engine's attention kernel (torch SDPA; model.fast runs eager for harvesting)
    attention = model.fast.config._attn_implementation
    model.fast.set_attn_implementation("sdpa")
    try:
        hf_generate(model, requests[: args.hf_batch], args.hf_batch)  # warm, untimed
        started = time.monotonic()
        useful = hf_generate(model, requests, args.hf_batch)
        hf_tps = useful / (time.monotonic() - started)
    finally:
        model.fast.set_attn_implementation(attention)
    return {
        "requests": len(requests),
        "hf_batch": args.hf_batch,
        "attention": "sdpa (both)",
        "engine_tok_per_s": round(engine_tps, 2),
        "hf_tok_per_s": round(hf_tps, 2),
        "ratio": round(engine_tps / hf_tps, 2),
    }


def hf_generate(model, requests, batch_size: int) -> int:
    """The requests through transformers `generate` in static left-padded batches, each run to
    its longest request; returns the useful tokens (each request's own length)."""
    useful, pad = 0, model.tokenizer.pad_token_id or 0
    for b in range(0, len(requests), batch_size):
        batch = requests[b : b + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        longest = max(n for _, n in batch)
        model.fast.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=False,
            pad_token_id=pad,
        )
        useful += sum(n for _, n in batch)  # tokens past a request's own length are waste
    return useful


def bench_prefix(model, args) -> dict:
    rng = random.Random(4)
    system = [rng.randrange(*VOCAB) for _ in range(args.system_len)]
    requests = [
        (system + [rng.randrange(*VOCAB) for _ in range(16)], 8)
        for _ in range(args.prefix_requests)
    ]
    result = {"system_prompt_tokens": args.system_len, "requests": len(requests)}
    for cache in (True, False):
        engine = LLMEngine(
            EngineConfig(model=args.model, enable_prefix_cache=cache, max_num_batched_tokens=1024),
            model,
        )
        warm(engine)
        ttfts = []
        for prompt, n in requests:  # one at a time: TTFT is the prefill of what is not cached
            ttfts.append(run_arrivals(engine, [(prompt, n)], [0.0])[0]["ttft"])
        result["on" if cache else "off"] = {
            "ttft_mean_s": round(statistics.mean(ttfts), 4),
            "ttft_mean_after_first_s": round(statistics.mean(ttfts[1:]), 4),
        }
    result["ttft_ratio_on_off"] = round(
        result["on"]["ttft_mean_s"] / result["off"]["ttft_mean_s"], 3
    )
    return result


def _hooked(model, args, on: bool, **settings) -> tuple[LLMEngine, object]:
    from bench_probes import random_probes

    from serve_hooks.hook import FeatureHook

    engine = LLMEngine(EngineConfig(model=args.model, **settings), model)
    hook = None
    if on:
        cfg = json.loads((Path(args.sae) / "cfg.json").read_text())
        probes = random_probes(model.d_model, cfg["n_latents"], torch.Generator().manual_seed(0))
        for probe in probes:  # they read the SAE's hook (sparse and graph probes read its code)
            probe.hook = cfg["hook"]
        hook = FeatureHook(engine, [args.sae], probes)
    warm(engine)
    return engine, hook


def bench_hooks_poisson(model, args) -> dict:
    requests = workload(args.n, seed=1, out_len=(16, 64))
    rng, t, arrivals = random.Random(2), 0.0, []
    for _ in requests:
        t += rng.expovariate(args.hook_rate)
        arrivals.append(t)
    runs = {"poisson": arrivals, "all_at_once": [0.0] * len(requests)}
    rows: dict[str, dict[str, list[dict]]] = {name: {"off": [], "on": []} for name in runs}
    for _ in range(args.rounds):
        for name, times in runs.items():
            for side in ("off", "on"):
                engine, _ = _hooked(model, args, side == "on", max_num_batched_tokens=256)
                rows[name][side].append(
                    summarize(run_arrivals(engine, requests, times), args.slo_ttft, args.slo_tpot)
                )
                print(json.dumps({f"hooks {name} {side}": rows[name][side][-1]}), file=sys.stderr)
    out = {"rate": args.hook_rate, "rounds": args.rounds}
    for name, sides in rows.items():
        med = {
            side: {
                k: statistics.median(r[k] for r in runs_)
                for k in ("output_tok_per_s", "ttft_mean_s", "tpot_mean_ms")
            }
            for side, runs_ in sides.items()
        }
        out[name] = {
            "off": med["off"],
            "on": med["on"],
            "throughput_ratio": round(
                med["on"]["output_tok_per_s"] / med["off"]["output_tok_per_s"], 3
            ),
            "ttft_ratio": round(med["on"]["ttft_mean_s"] / med["off"]["ttft_mean_s"], 3),
            "tpot_ratio": round(med["on"]["tpot_mean_ms"] / med["off"]["tpot_mean_ms"], 3),
        }
    return out


def bench_hooks_prefix(model, args) -> dict:
    rng = random.Random(4)
    system = [rng.randrange(*VOCAB) for _ in range(args.system_len)]
    requests = [
        (system + [rng.randrange(*VOCAB) for _ in range(16)], 8)
        for _ in range(args.prefix_requests)
    ]
    ttfts: dict[str, list[float]] = {"off": [], "on": []}
    hits: dict[str, int] = {}
    for _ in range(args.rounds):
        for side in ("off", "on"):
            engine, hook = _hooked(model, args, side == "on", max_num_batched_tokens=1024)
            before = engine.cache.stats["prefix_hit_tokens"]
            reused = hook.stats["reused_tokens"] if hook else 0
            for prompt, n in requests:
                ttfts[side].append(run_arrivals(engine, [(prompt, n)], [0.0])[0]["ttft"])
            hits[side] = engine.cache.stats["prefix_hit_tokens"] - before
            if hook is not None:
                hits["features_reused"] = hook.stats["reused_tokens"] - reused
    mean = {side: statistics.mean(v) for side, v in ttfts.items()}
    return {
        "system_prompt_tokens": args.system_len,
        "requests": len(requests),
        "rounds": args.rounds,
        "ttft_mean_s": {k: round(v, 4) for k, v in mean.items()},
        "ttft_ratio_on_off": round(mean["on"] / mean["off"], 3),
        "prefix_hit_tokens": hits,
        "feature_reuse_fraction": round(hits["features_reused"] / max(1, hits["off"]), 4),
    }


def bench_long(model, args) -> dict:
    requests = workload(
        args.long_requests, seed=5, prompt_len=(8, 24), out_len=(args.long_out, args.long_out)
    )
    engine = LLMEngine(
        EngineConfig(
            model=args.model,
            num_blocks=args.long_blocks,
            max_num_seqs=256,
            max_num_batched_tokens=256,
        ),
        model,
    )
    bs, samples, peak = engine.cfg.block_size, [], [0]

    def observe(e: LLMEngine) -> None:
        running = e.scheduler.running
        allocated = sum(len(s.block_table) for s in running) * bs
        if allocated:
            samples.append(sum(s.num_computed for s in running) / allocated)
        peak[0] = max(peak[0], len(running))

    run_arrivals(engine, requests, [0.0] * len(requests), on_step=observe)
    pool_tokens = args.long_blocks * bs
    per_request = max(len(p) + n for p, n in requests)
    return {
        "requests": len(requests),
        "pool_tokens": pool_tokens,
        "block_size": bs,
        "live_fraction_of_allocated_slots": round(statistics.mean(samples), 4),
        "peak_concurrent_requests": peak[0],
        "contiguous_fit_at_request_max_len": pool_tokens // per_request,
        "contiguous_fit_at_model_max_len": pool_tokens // engine.max_model_len,
    }


def bench_load(model, args) -> dict:
    requests = workload(args.load_requests, seed=6, prompt_len=(8, 64), out_len=(2, 12))
    rng = random.Random(7)
    arrivals, t = [], 0.0
    for _ in requests:
        t += rng.expovariate(args.load_rate)
        arrivals.append(t)
    small = LLMEngine(
        EngineConfig(model=args.model, num_blocks=args.load_blocks, max_num_batched_tokens=256),
        model,
    )
    pressured = run_arrivals(small, requests, arrivals, strict=False)
    roomy = LLMEngine(EngineConfig(model=args.model, max_num_batched_tokens=256), model)
    reference = run_arrivals(roomy, requests, [0.0] * len(requests))
    small.cache.check()
    # lost: submitted, but not completed with the token count it asked for
    lost = [
        i
        for i, (row, (_, n_out)) in enumerate(zip(pressured, requests, strict=True))
        if row is None or len(row["tokens"]) != n_out
    ]
    differ = [
        i
        for i, (a, b) in enumerate(zip(pressured, reference, strict=True))
        if a is not None and a["tokens"] != b["tokens"]
    ]
    return {
        "requests": len(requests),
        "blocks": args.load_blocks,
        "completed": sum(row is not None for row in pressured),
        "lost": len(lost),
        "first_lost": lost[:5],
        "outputs_differing": len(differ),
        "first_differing": differ[:5],
        "preemptions": small.scheduler.num_preemptions,
        "evicted_blocks": small.cache.stats["evicted"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="poisson,hf,prefix,long,vllm,load")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=32, help="requests per Poisson / HF run")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--slo-ttft", type=float, default=2.0, help="seconds")
    parser.add_argument("--slo-tpot", type=float, default=0.25, help="seconds per output token")
    parser.add_argument("--hf-batch", type=int, default=8)
    parser.add_argument("--system-len", type=int, default=1024)
    parser.add_argument("--prefix-requests", type=int, default=16)
    parser.add_argument("--long-requests", type=int, default=32)
    parser.add_argument("--long-out", type=int, default=1024)
    parser.add_argument("--long-blocks", type=int, default=2200)
    parser.add_argument("--load-requests", type=int, default=1000)
    parser.add_argument("--load-rate", type=float, default=50.0)
    parser.add_argument("--load-blocks", type=int, default=24)
    parser.add_argument(
        "--hooks", action="store_true", help="run the hook benchmarks (hooks_poisson,hooks_prefix)"
    )
    parser.add_argument(
        "--sae", default="out/quality/topk/blocks.15.hook_resid_post", help="SAE for --hooks"
    )
    parser.add_argument(
        "--hook-rate", type=float, default=2.0, help="Poisson rate of hooks_poisson"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="off/on rounds of the hook benchmarks (medians)"
    )
    parser.add_argument(
        "--vllm-rounds", type=int, default=3, help="rounds of the vllm comparison (medians)"
    )
    args = parser.parse_args()
    if args.hooks:
        args.only = "hooks_poisson,hooks_prefix"
        if not (Path(args.sae) / "cfg.json").exists():
            parser.error(
                f"--sae {args.sae} holds no cfg.json: train an SAE (python -m sae train) or "
                "point --sae at one"
            )
    from sae.models import load_model

    model = load_model(args.model)
    VOCAB[1] = min(VOCAB[1], model.fast.config.vocab_size)
    result = {"threads": torch.get_num_threads(), "model": args.model}
    benches = {
        "poisson": lambda: bench_poisson(model, args),
        "hf": lambda: bench_hf(model, args),
        "prefix": lambda: bench_prefix(model, args),
        "long": lambda: bench_long(model, args),
        "vllm": lambda: _vllm_side.compare_with_greylens(args.model, rounds=args.vllm_rounds),
        "load": lambda: bench_load(model, args),
        "hooks_poisson": lambda: bench_hooks_poisson(model, args),
        "hooks_prefix": lambda: bench_hooks_prefix(model, args),
    }
    for name in args.only.split(","):
        started = time.monotonic()
        result[name] = benches[name]()
        result[name]["bench_seconds"] = round(time.monotonic() - started, 1)
        print(json.dumps({name: result[name]}), file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
