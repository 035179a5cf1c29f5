"""Helpers shared by the SAE trainer's tests (tests/sae/test_train.py, test_sparsity.py)."""

from __future__ import annotations

import json
from pathlib import Path

from sae.config import TrainConfig
from sae.store import ActivationStore

HOOK = "blocks.1.hook_resid_post"


def train_config(store: ActivationStore, out: Path, **overrides) -> TrainConfig:
    """A short run on the tiny store: 40 steps of 256 tokens, 4× expansion, no wandb."""
    fields = dict(
        store=str(store.directory),
        out=str(out),
        hooks=HOOK,
        arch="topk",
        k=8,
        expansion=4,
        tokens=256 * 40,
        batch_size=256,
        lr=3e-3,
        log_every=5,
        wandb="disabled",
        dead_tokens=2048,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def metric_rows(out: Path, hook: str = HOOK) -> list[dict]:
    """The run's metrics.jsonl rows of one hook."""
    return [
        r
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if r["hook"] == hook
    ]
