"""The firing tracker: dead and dense latents, and the default dead-latent window."""

from __future__ import annotations

import torch

from sae.codes import SparseCode
from sae.config import TrainConfig
from sae.firing import FiringTracker, dead_window


def _window(cfg: TrainConfig) -> int:
    return dead_window(cfg.dead_tokens, cfg.tokens, cfg.batch_size)


def test_the_default_dead_window_is_a_fifth_of_the_run_so_auxk_acts_in_short_runs() -> None:
    assert _window(TrainConfig(tokens=1_000_000)) == 200_000  # a fixed 1M would never trigger here
    assert _window(TrainConfig(tokens=100_000_000)) == 1_000_000
    assert _window(TrainConfig(tokens=1000, batch_size=4096)) == 4096
    assert _window(TrainConfig(tokens=1_000_000, dead_tokens=5000)) == 5000


def test_tracker_counts_firings_finds_dead_latents_and_restarts_the_dense_window() -> None:
    tracker = FiringTracker.zeros(4)
    # 10 tokens: latent 0 fires on all of them, latent 1 on one, latent 2 only with a zero value
    values, cols = torch.tensor([1.0] * 10 + [2.0, 0.0]), torch.tensor([0] * 10 + [1, 2])
    rows = torch.tensor(list(range(10)) + [3, 4])
    tracker.update(SparseCode(values, cols, rows, 10), n_tokens=10)
    assert tracker.fire_counts.tolist() == [10, 1, 0, 0]
    assert tracker.tokens_since_fired.tolist() == [0, 0, 10, 10]
    assert tracker.dead(window=10).tolist() == [False, False, True, True]
    assert tracker.dead(window=11).tolist() == [False, False, False, False]
    fractions = tracker.log_fractions(window=10, tokens_logged=10)
    assert fractions == {"dead_fraction": 0.5, "dense_fraction": 0.25}
    assert tracker.fire_counts.tolist() == [0, 0, 0, 0]  # a new dense-count window
    assert tracker.tokens_since_fired.tolist() == [0, 0, 10, 10]
