"""Data-dependent initialisation of a hook's SAE training, following the literature.

- Inputs are scaled so that E‖x‖ = √d_in; the scale is kept in the SAE config, so inference takes
  raw activations. Rows above `outlier_ratio` × the median norm (massive activations) are left out
  of the fit and skipped by training.
- Decoder rows are random unit vectors and the encoder is their transpose (`SAE.reset_parameters`).
- b_dec starts at the geometric median of a sample, a robust centre of the data.
- jumprelu/relu start with about k latents active per token (`sae.sparsity.start_with_k_active`).
"""

from __future__ import annotations

import math

import torch

from sae.config import TrainConfig, base_lr, optimizer_name
from sae.firing import FiringTracker
from sae.optim import make_optimizer, param_groups
from sae.sae import SAE, SAEConfig
from sae.sparsity import initial_sparsity_coeff, start_with_k_active
from sae.state import HookState
from sae.store import ActivationStore


def geometric_median(points: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """Weiszfeld's algorithm. points: [m, d] -> [d]: the point minimising Σ‖p − y‖."""
    y = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - y).norm(dim=1).clamp_min(1e-8)  # [m]
        y = (weights[:, None] * points).sum(0) / weights.sum()
    return y


def init_sae(cfg: TrainConfig, store: ActivationStore, hook: str) -> SAE:
    """A fresh SAE for `hook`, initialised from a seeded sample of the store, on cfg.device."""
    sample = store.rows(store.epoch_order(cfg.seed)[:8192], hooks=[hook])[hook]  # [≤8192, d]
    norms = sample.norm(dim=1)
    max_norm = cfg.outlier_ratio * norms.median().item() if cfg.outlier_ratio > 0 else 0.0
    if max_norm:
        sample = sample[norms <= max_norm]
    scale = math.sqrt(store.d_model) / sample.norm(dim=1).mean().item()
    sae_cfg = SAEConfig(
        d_in=store.d_model,
        n_latents=cfg.expansion * store.d_model,
        arch=cfg.arch,
        k=cfg.k,
        hook=hook,
        model=store.manifest.model,
        weights_sha256=store.manifest.weights_sha256,
        model_record=store.manifest.model_record,
        input_scale=scale,
        max_input_norm=max_norm,
        jumprelu_bandwidth=cfg.jumprelu_bandwidth,
        sparsity_coeff=initial_sparsity_coeff(cfg) if cfg.target_l0 else 0.0,
    )
    sae = SAE(sae_cfg)
    sae.reset_parameters(torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample * scale))
        if cfg.arch in ("jumprelu", "relu"):
            start_with_k_active(sae, sample[:2048] * scale, cfg.k)
    return sae.to(cfg.device)


def init_hook_state(cfg: TrainConfig, store: ActivationStore, hook: str) -> HookState:
    """A fresh SAE for `hook`, its optimizer and its firing tracker."""
    sae = init_sae(cfg, store, hook)
    n_latents = sae.cfg.n_latents
    groups = param_groups(sae, cfg.threshold_lr_scale)
    optimizer = make_optimizer(optimizer_name(cfg), groups, base_lr(cfg, n_latents))
    return HookState(sae, optimizer, FiringTracker.zeros(n_latents, cfg.device))
