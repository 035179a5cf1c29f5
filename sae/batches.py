"""Batch stepping: the (step, batch) sequence a training run walks, resumable at any step.

Step s of a run always gets the same batch: the store is read in seeded shuffled epochs, and a
run that is longer than one epoch starts a new epoch with its own order. Only full batches are
used, so every step has the same global batch size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from sae.store import ActivationStore


def step_batches(
    store: ActivationStore,
    batch_size: int,
    seed: int,
    hooks: list[str],
    start_step: int,
    n_steps: int,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(step, batch) for steps start_step..n_steps-1; batch[hook]: [batch_size, d_model]."""
    per_epoch = len(store) // batch_size
    step = start_step
    while step < n_steps:
        epoch, first = divmod(step, per_epoch)
        for batch in store.batches(batch_size, seed, hooks, epoch=epoch, start_batch=first):
            if step >= n_steps or len(batch["token_ids"]) < batch_size:
                break
            yield step, batch
            step += 1
