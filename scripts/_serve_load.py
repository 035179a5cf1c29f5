"""The workload side of scripts/bench_serve.py: synthetic requests, Poisson feeding of the engine
and the per-request timings and their summary (TTFT, TPOT, goodput)."""

from __future__ import annotations

import random
import statistics
import time

from serve_hooks.engine import LLMEngine
from serve_hooks.sequence import SamplingParams

# Token ids drawn for synthetic prompts (main() caps it at the model's vocabulary).
VOCAB = [100, 40000]


def workload(
    n: int, seed: int, prompt_len=(16, 256), out_len=(16, 128)
) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(*VOCAB) for _ in range(rng.randint(*prompt_len))], rng.randint(*out_len))
        for _ in range(n)
    ]


def warm(engine: LLMEngine) -> None:
    """One small untimed request, so first-touch costs (allocator, KV pages, kernels) stay out of
    the timings."""
    engine.generate(
        [list(range(VOCAB[0], VOCAB[0] + 64))], SamplingParams(max_tokens=4, ignore_eos=True)
    )


def run_arrivals(
    engine: LLMEngine, requests, arrivals: list[float], on_step=None, strict: bool = True
) -> list[dict | None]:
    """Feed requests at their arrival offsets (seconds) and step the engine; per-request timings.
    A request the engine never finished is None, or with `strict` an error."""
    t0 = time.monotonic()
    pending = sorted(zip(arrivals, range(len(requests)), strict=True))
    seqs, done = {}, {}
    while pending or engine.has_unfinished():
        now = time.monotonic() - t0
        while pending and pending[0][0] <= now:
            arrival, i = pending.pop(0)
            prompt, n_out = requests[i]
            seq = engine.add_request(prompt, SamplingParams(max_tokens=n_out, ignore_eos=True))
            seqs[seq.seq_id] = (i, t0 + arrival, seq)
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(0.01, pending[0][0] - now)) if pending else 0.0)
            continue
        for out in engine.step():
            if out.finished:
                i, arrived, seq = seqs[out.seq_id]
                end = time.monotonic()
                ttft = seq.first_token_time - arrived
                tpot = (end - seq.first_token_time) / max(1, len(out.token_ids) - 1)
                done[i] = {
                    "ttft": ttft,
                    "tpot": tpot,
                    "end": end - t0,
                    "tokens": out.token_ids,
                    "cached": out.num_cached_tokens,
                }
        if on_step:
            on_step(engine)
    missing = [i for i in range(len(requests)) if i not in done]
    if strict and missing:
        raise RuntimeError(f"the engine never finished requests {missing[:10]} of {len(requests)}")
    return [done.get(i) for i in range(len(requests))]


def summarize(rows: list[dict], slo_ttft: float, slo_tpot: float) -> dict:
    makespan = max(r["end"] for r in rows)
    good = sum(1 for r in rows if r["ttft"] <= slo_ttft and r["tpot"] <= slo_tpot)
    pct = lambda xs, q: sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    ttft, tpot = [r["ttft"] for r in rows], [r["tpot"] for r in rows]
    return {
        "requests": len(rows),
        "output_tok_per_s": round(sum(len(r["tokens"]) for r in rows) / makespan, 2),
        "ttft_mean_s": round(statistics.mean(ttft), 3),
        "ttft_p90_s": round(pct(ttft, 0.9), 3),
        "tpot_mean_ms": round(1000 * statistics.mean(tpot), 1),
        "tpot_p90_ms": round(1000 * pct(tpot, 0.9), 1),
        "goodput_req_per_s": round(good / makespan, 3),
        "slo_met": f"{good}/{len(rows)}",
    }
