"""The learning-rate schedule: linear warm-up, constant, then an optional linear decay to 0.

Adam runs decay over the last `decay_frac` of the steps; schedule-free AdamW needs no decay (its
averaged weights play that part), so its runs pass decay_frac 0.
"""

from __future__ import annotations


def lr_at(base: float, step: int, n_steps: int, warmup_frac: float, decay_frac: float) -> float:
    """The LR of step `step` (0-based) of an n_steps run: base × a factor in (0, 1]."""
    warmup = max(1, int(warmup_frac * n_steps))
    decay = int(decay_frac * n_steps)
    factor = min(1.0, (step + 1) / warmup)
    if decay and step >= n_steps - decay:
        factor = min(factor, (n_steps - step) / decay)
    return base * factor
