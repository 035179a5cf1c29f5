"""SAE metrics: one definition each (DESIGN.md), pinned by hand-computed reference tests.

- L0: mean number of non-zero latents per token.
- FVU: Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the evaluation set, mean(x) being the per-dimension mean
  over tokens; explained variance = 1 − FVU.
- MSE: mean over tokens and dimensions of (x − x̂)².
- dead fraction: latents that never fired in the last N tokens (N from the config).
- dense fraction: latents that fire on more than 10% of tokens.
- CE loss recovered: (CE_zero − CE_spliced) / (CE_zero − CE_clean); ΔCE = CE_spliced − CE_clean;
  KL = mean over tokens of KL(p_clean ‖ p_spliced).
"""

from __future__ import annotations

import torch

DENSE_FIRING_RATE = 0.10


def l0(acts: torch.Tensor) -> float:
    """acts: [N, n_latents] dense codes."""
    return (acts != 0).sum(1).double().mean().item()


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """x, x_hat: [N, d]."""
    x, x_hat = x.double(), x_hat.double()
    return ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return 1.0 - fvu(x, x_hat)


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return (x.double() - x_hat.double()).pow(2).mean().item()


def dead_fraction(tokens_since_fired: torch.Tensor, window: int) -> float:
    """tokens_since_fired: [n_latents]; dead = not fired in the last `window` tokens."""
    return (tokens_since_fired >= window).float().mean().item()


def dense_fraction(fire_counts: torch.Tensor, n_tokens: int) -> float:
    """fire_counts: [n_latents] tokens each latent fired on, out of n_tokens."""
    return (fire_counts.float() / max(n_tokens, 1) > DENSE_FIRING_RATE).float().mean().item()


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    return (ce_zero - ce_spliced) / (ce_zero - ce_clean)


def kl_divergence(clean_logits: torch.Tensor, other_logits: torch.Tensor) -> float:
    """Mean over tokens of KL(p_clean ‖ p_other). logits: [..., vocab]."""
    log_p = clean_logits.double().log_softmax(-1)
    log_q = other_logits.double().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


class FVUAccumulator:
    """FVU, MSE and L0 over an evaluation set streamed in batches (exact, float64 sums)."""

    def __init__(self, d: int) -> None:
        self.n = 0
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.sum_x2 = torch.zeros(d, dtype=torch.float64)
        self.sum_err2 = 0.0
        self.sum_active = 0

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, n_active: int) -> None:
        x64 = x.double()
        self.n += x.shape[0]
        self.sum_x += x64.sum(0)
        self.sum_x2 += x64.pow(2).sum(0)
        self.sum_err2 += (x64 - x_hat.double()).pow(2).sum().item()
        self.sum_active += n_active

    def result(self) -> dict[str, float]:
        total_variance = (self.sum_x2 - self.sum_x.pow(2) / self.n).sum().item()
        fvu_value = self.sum_err2 / total_variance
        return {
            "fvu": fvu_value,
            "explained_variance": 1.0 - fvu_value,
            "mse": self.sum_err2 / (self.n * self.sum_x.numel()),
            "l0": self.sum_active / self.n,
        }
