"""What the trainer's config resolves: the "auto" optimizer and the default LR and its schedule."""

from __future__ import annotations

import pytest

from sae.config import TrainConfig, base_lr, lr_decay_frac, optimizer_name
from sae.schedule import lr_at


def _lr(cfg: TrainConfig, step: int, n_steps: int = 100, n_latents: int = 16384) -> float:
    """The LR the trainer uses at `step` under cfg (as sae.train.train computes it)."""
    return lr_at(base_lr(cfg, n_latents), step, n_steps, cfg.warmup_frac, lr_decay_frac(cfg))


def test_the_optimizer_is_schedule_free_for_topk_and_adam_with_decay_otherwise() -> None:
    for arch in ("topk", "batchtopk", "matryoshka", "jumprelu", "relu"):
        expected = "schedulefree" if arch == "topk" else "adam"
        assert optimizer_name(TrainConfig(arch=arch)) == expected
        assert optimizer_name(TrainConfig(arch=arch, optimizer="schedulefree")) == "schedulefree"
    sf, adam = TrainConfig(arch="topk"), TrainConfig(arch="topk", optimizer="adam")
    assert (
        base_lr(sf, 16384) == 5e-3
        and base_lr(adam, 16384) == 2e-3
        and base_lr(TrainConfig(lr=1e-3), 16384) == 1e-3
    )
    # schedule-free has no decay; Adam decays linearly to 0 over the last 20 steps
    assert _lr(sf, 99) == 5e-3 and _lr(adam, 99) == pytest.approx(2e-3 / 20)
    assert _lr(sf, 0) == _lr(adam, 0) / 2e-3 * 5e-3  # both warm up
