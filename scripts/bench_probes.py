"""Probe overhead relative to the model forward (goal: probes add < 1%; SAE encode counted apart).

Two settings, each timed as a ratio against the forward in the same run (the machine is shared):

- prefill: a batch of texts (default 8 × 128 tokens). Forward = SmolLM2's full forward to logits.
  Probe time = scoring every token with one probe of each kind (linear, mean-diff, sparse k=16,
  graph query) given the hook's activations and, for SAE probes, their code. The SAE encode
  itself (what a sparse probe needs first) is reported as its own ratio.
- decode: one generated token with a KV cache (batch 1), the unit of `Lens.monitor`; the same
  probes score the one new row.

Weights are random with the real shapes (timing does not depend on their values). Prints JSON.

    python scripts/bench_probes.py [--sae out/quality/topk/blocks.15.hook_resid_post] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from probes.activations import Features, Ragged, encode, load_encoder, tokenize
from probes.probe import Probe
from sae.hooks import recording
from sae.models import load_model
from sae.sae import SAE, SAEConfig

HOOK = "blocks.15.hook_resid_post"  # the default of --hook


def random_probes(
    d_model: int, n_latents: int, generator: torch.Generator, hook: str = HOOK
) -> list[Probe]:
    def features(k: int) -> torch.Tensor:
        return torch.randperm(n_latents, generator=generator)[:k].sort().values

    common = dict(hook=hook, d_model=d_model, aggregation="mean", bias=0.1)
    return [
        Probe("linear", weight=torch.randn(d_model, generator=generator), **common),
        Probe("mean_diff", weight=torch.randn(d_model, generator=generator), **common),
        Probe(
            "sparse",
            weight=torch.randn(16, generator=generator),
            features=features(16),
            sae="-",
            **common,
        ),
        Probe("graph", weight=torch.ones(1), features=features(2), sae="-", **common),
    ]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def score_all(probes: list[Probe], features: Features) -> None:
    for probe in probes:
        probe.text_scores(features)


@torch.inference_mode()
def prefill(model, sae, probes, texts: list[str], tokens: int, repeats: int) -> dict:
    ids = torch.stack([row[:tokens] for row in tokenize(model.tokenizer, texts, tokens)])  # [B, T]
    hook = probes[0].hook  # every probe reads the same hook
    with recording(model, [hook]) as latest:
        model.fast(ids, use_cache=False)
        acts = latest()[hook][:, 1:].reshape(-1, model.d_model).float()  # [B·(T−1), d]
    offsets = torch.arange(0, acts.shape[0] + 1, tokens - 1)
    ragged = Ragged(acts, offsets)
    code, n_latents = encode(sae, ragged)
    features = Features(ragged, code, n_latents)
    rows = {"forward": [], "probes": [], "sae_encode": [], **{p.kind: [] for p in probes}}
    for _ in range(repeats):  # interleaved: each ratio compares timings taken moments apart
        rows["forward"].append(timed(lambda: model.fast(ids, use_cache=False)))
        rows["probes"].append(timed(lambda: score_all(probes, features)))
        rows["sae_encode"].append(timed(lambda: encode(sae, ragged)))
        for p in probes:
            rows[p.kind].append(timed(lambda p=p: p.text_scores(features)))
    return _ratios(rows, n_tokens=int(ids.numel()))


@torch.inference_mode()
def decode(model, sae, probes, prompt: str, steps: int, repeats: int) -> dict:
    """Per generated token: a plain cached forward, the same forward with the hook recorder on
    (its extra cost counts as the probes'), the SAE encode and the probes on the one new row.
    The cache is cropped back after each forward so every forward sees the same context, and the
    plain / recorded order alternates so neither always runs second."""
    ids = tokenize(model.tokenizer, [prompt], 64)[0][None]
    token = torch.tensor([[int(model.tokenizer.eos_token_id or 0) + 1]])
    cache = model.fast(ids, use_cache=True).past_key_values

    def step() -> float:
        elapsed = timed(lambda: model.fast(token, past_key_values=cache, use_cache=True))
        cache.crop(-1)  # drop the token just appended
        return elapsed

    rows = {
        "forward": [],
        "hook_recorder": [],
        "probes": [],
        "sae_encode": [],
        **{p.kind: [] for p in probes},
    }
    for i in range(repeats * steps):
        times = {}
        for mode in ("plain", "recorded") if i % 2 == 0 else ("recorded", "plain"):
            if mode == "plain":
                times[mode] = step()
                continue
            with recording(model, [probes[0].hook]) as latest:
                times[mode] = step()
                x = latest()[probes[0].hook][0].float()  # [1, d_model]: the new token's row
        plain, recorded = times["plain"], times["recorded"]
        row = Ragged(x, torch.tensor([0, 1]))
        rows["forward"].append(plain)
        rows["hook_recorder"].append(recorded - plain)
        rows["sae_encode"].append(timed(lambda row=row: encode(sae, row)))
        features = Features(row, encode(sae, row)[0], sae.cfg.n_latents)
        rows["probes"].append(
            timed(lambda f=features: score_all(probes, f)) + rows["hook_recorder"][-1]
        )
        for p in probes:
            rows[p.kind].append(timed(lambda p=p, f=features: p.text_scores(f)))
    return _ratios(rows, n_tokens=1)


def _ratios(rows: dict[str, list[float]], n_tokens: int) -> dict:
    forward = rows["forward"]
    out = {"tokens_per_forward": n_tokens, "forward_ms": 1000 * statistics.median(forward)}
    for key, times in rows.items():
        if key != "forward":
            out[f"{key}_over_forward"] = statistics.median(
                t / f for t, f in zip(times, forward, strict=True)
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sae", default="", help="SAE directory at layer 15 (default: a random 9216-wide TopK SAE)"
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", default=HOOK)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model(args.model)
    sae = (
        load_encoder(args.sae)
        if args.sae
        else SAE(SAEConfig(d_in=model.d_model, n_latents=16 * model.d_model, k=32))
    )
    generator = torch.Generator().manual_seed(0)
    probes = random_probes(model.d_model, sae.cfg.n_latents, generator, args.hook)
    from sae.corpus import load_corpus

    texts = [doc[:4000] for doc in load_corpus("default", "heldout")["text"][: args.batch]]
    result = {
        "threads": torch.get_num_threads(),
        "prefill": prefill(model, sae, probes, texts, args.tokens, args.repeats),
        "decode": decode(model, sae, probes, texts[0][:200], args.decode_steps, args.repeats),
    }
    result["goal_probes_under_1pct"] = all(
        result[s]["probes_over_forward"] < 0.01 for s in ("prefill", "decode")
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
