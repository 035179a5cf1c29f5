"""The main job (`make demo`): harvest real activations of SmolLM2-135M-Instruct into a store.

Stage 1 of the greylens data flow: 200k tokens of Shakespeare, Milton and the KJV through the
model, residual stream after block 15 (the forward stops there), saved as float16 shards under
out/demo/store. Killed half-way? Run it again: it resumes where it stopped.
Later stages (SAE training, feature graph, probes, serving) extend this script as they land.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sae import ActivationStore, HarvestConfig, harvest, load_model

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
        "documents": len({d for i in range(len(store.manifest.shards)) for d in store.shard(i)["doc_ids"].tolist()}),
        "first_window_text": tokenizer.decode(first_window["token_ids"].tolist())[:200],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--out", default="out/demo/store")
    args = parser.parse_args()

    model = load_model("smollm2-135m")
    cfg = HarvestConfig(out=args.out, model="smollm2-135m", hooks=HOOK, tokens=args.tokens, context_size=128)
    started = time.perf_counter()
    store = harvest(cfg, model)
    print(json.dumps(describe(store, model.tokenizer, time.perf_counter() - started), indent=2))


if __name__ == "__main__":
    main()
