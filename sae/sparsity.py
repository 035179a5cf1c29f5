"""How training sets the sparsity of the dense architectures (jumprelu, relu).

- The fixed schedule: λ rises linearly from 0 to its final value over the sparsity warm-up.
- `--target-l0 K`: a controller in log λ. Each step uses λ = λ_I · (L0/K)^gain with that batch's
  own L0 (proportional part); λ_I integrates log(L0/K) after the warm-up (integral part) and is
  saved in the SAE config, so `--resume` continues exactly.
- Thresholds: at initialisation each latent's θ (jumprelu) or −b_enc (relu) sits at the (1 − k/n)
  quantile of its pre-activations, and `--reopen-dead` puts a dead jumprelu latent's θ back there.

Why jumprelu needs the last three: with the defaults its L0 falls far below k within the first
steps whatever λ is; a latent pushed below θ gets no gradient back, and log θ moves much slower
than the encoder moves a pre-activation.
"""

from __future__ import annotations

import math

import torch

from sae.config import TrainConfig
from sae.distributed import Distributed
from sae.sae import SAE

DEFAULT_SPARSITY_COEFF = {"relu": 0.004, "jumprelu": 0.0015}


def start_with_k_active(sae: SAE, x_n: torch.Tensor, k: int) -> None:
    """Dense archs: put each latent's threshold at the (1 − k/n) quantile of its pre-activations.

    With encoder = decoderᵀ and a near-zero threshold about half of all latents fire at first, and
    the first reconstructions are orders of magnitude too large. Starting from ~k active latents
    per token (θ for jumprelu, −b_enc for relu) lets the sparsity penalty refine rather than rescue.
    """
    pre = sae.pre_acts(x_n)  # [m, n_latents]
    rank = max(1, math.ceil((1 - k / sae.cfg.n_latents) * pre.shape[0]))
    quantile = pre.kthvalue(rank, dim=0).values.clamp_min(1e-3)  # [n_latents]
    if sae.cfg.arch == "jumprelu":
        sae.log_threshold.copy_(quantile.log())
    else:
        sae.b_enc.copy_(-quantile)


@torch.no_grad()
def reopen_thresholds(
    sae: SAE, x: torch.Tensor, dead: torch.Tensor, k: float, dist: Distributed | None = None
) -> None:
    """jumprelu: θ of each dead latent := the (1 − k/n) quantile of its pre-activations on x (raw
    [N, d]), the initial rule, so it fires on about k/n of the tokens again. Why: a latent pushed
    below θ gets no gradient from the reconstruction, and its θ none from the kernel once its
    pre-activations sit further below than ε/2; AuxK trains its weights, this lets it fire.

    With several ranks the quantile is the one of the global batch, exactly: it is the m-th largest
    of N rows with m = N − ⌈(1 − k/n)·N⌉ + 1 (about k/n·N, a handful), which is among the m largest
    of some rank, so the ranks exchange only their m largest per latent."""
    idx = dead.nonzero().squeeze(1)  # [n_dead]
    x_c = x.to(sae.W_enc.dtype) * sae.cfg.input_scale - sae.b_dec
    pre = torch.addmm(sae.b_enc[idx], x_c, sae.W_enc[idx].T)  # [N_local, n_dead]
    world = dist.world if dist is not None else 1
    n_rows = int(dist.sum(torch.tensor(pre.shape[0]))) if world > 1 else pre.shape[0]
    m = n_rows - max(1, math.ceil((1 - k / sae.cfg.n_latents) * n_rows)) + 1
    top = pre.topk(min(m, pre.shape[0]), dim=0).values  # [≤m, n_dead]
    if world > 1:  # equal shapes for the exchange: pad a short slice with -inf
        top = torch.cat([top, top.new_full((m - top.shape[0], top.shape[1]), -math.inf)])
        top = dist.gather(top).topk(m, dim=0).values  # [m, n_dead] of all ranks' candidates
    # Never below half the live latents' median θ: a dead latent's quantile can be ≤ 0, and a θ
    # near 0 makes it a ReLU that the encoder turns dense while log θ slowly climbs back.
    if bool((~dead).any()):
        floor = 0.5 * sae.log_threshold[~dead].exp().median()
    else:
        floor = pre.new_tensor(1e-3)
    sae.log_threshold[idx] = torch.maximum(top[-1], floor.clamp_min(1e-3)).log()


def initial_sparsity_coeff(cfg: TrainConfig) -> float:
    """λ at the end of the warm-up (fixed schedule) or λ_I's start (target L0)."""
    return cfg.sparsity_coeff or DEFAULT_SPARSITY_COEFF.get(cfg.arch, 0.0)


def sparsity_warmup_steps(cfg: TrainConfig, n_steps: int) -> int:
    """Steps of λ's warm-up, during which the target-L0 controller does not integrate."""
    return max(1, int(cfg.sparsity_warmup_frac * n_steps))


def sparsity_coeff_at(cfg: TrainConfig, step: int, n_steps: int) -> float:
    """The fixed schedule (no target L0): linear warm-up of λ to its final value."""
    return initial_sparsity_coeff(cfg) * min(1.0, (step + 1) / sparsity_warmup_steps(cfg, n_steps))


def _l0_error(cfg: TrainConfig, l0: float) -> float:
    return max(-1.0, min(1.0, math.log(max(l0, 1e-3) / cfg.target_l0)))  # > 0: too dense


def adapt_sparsity_coeff(cfg: TrainConfig, coeff: float, l0: float) -> float:
    """The target-L0 controller's integral part: λ_I ← λ_I · exp(rate · clamp(log(L0/target), ±1)).

    Integral control in log λ (the graph trainer's evidence budget is the same idea in k): λ_I grows
    while the batch L0 is above the target and shrinks below it, by at most e^±rate per step, so it
    crosses decades in tens of steps and needs no prior guess of its scale. L0 is the global batch
    L0, so data-parallel ranks all take the same λ. λ_I stays within 10^±6 of where it started.
    The trainer does not integrate during the sparsity warm-up (anti-windup): early on JumpReLU's
    L0 dips far below any target whatever λ is, and λ_I would sink by decades that it then takes a
    hundred steps to climb back."""
    start = initial_sparsity_coeff(cfg)
    return min(
        start * 1e6, max(start * 1e-6, coeff * math.exp(cfg.l0_control_rate * _l0_error(cfg, l0)))
    )


def applied_sparsity_coeff(cfg: TrainConfig, integral: float, l0_now: float) -> float:
    """The λ a step uses under a target L0: λ_I · exp(gain · clamp(log(L0 / target), ±1)), where L0
    is this very batch's (measured in the forward pass, before the loss): the proportional part,
    which answers at once to what the slow integral has not caught up with yet."""
    return integral * math.exp(cfg.l0_control_gain * _l0_error(cfg, l0_now))
