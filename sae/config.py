"""The SAE trainer's configuration: `python -m sae train`'s flags, one field each.

Field docstrings are the `--help` text. The helpers below resolve the fields whose 0 or "auto"
means "pick for me", so every trainer and script reads the same resolved values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sae.device import resolve_device, resolve_dtype
from sae.optim import OptimizerName, default_lr
from sae.sae import Architecture


@dataclass
class TrainConfig:
    store: str = ""
    """Activation store directory (from `python -m sae harvest`)."""
    out: str = ""
    """Output directory: one SAE per hook under out/<hook>/, plus checkpoint, metrics and plots."""
    hooks: str = ""
    """Comma-separated hooks to train, one SAE each, all from one pass (default: every hook in the
    store)."""
    arch: Architecture = "topk"
    """SAE variant."""
    k: int = 32
    """Active latents per token (topk; batchtopk and matryoshka on average)."""
    expansion: int = 16
    """n_latents = expansion × d_model."""
    tokens: int = 1_000_000
    """Training tokens (the store is re-read in new shuffled epochs if it is smaller)."""
    batch_size: int = 4096
    """Tokens per optimizer step (global, over all ranks)."""
    optimizer: Literal["auto", "adam", "schedulefree"] = "auto"
    """adam: Adam with warm-up and a linear decay to 0. schedulefree: schedule-free AdamW (Defazio
    et al. 2024; the `schedulefree` package), β1 0.95, no decay: the saved SAE is its averaged
    point.
    auto: schedulefree for topk (a lower FVU for the same tokens), adam for the others
    (schedule-free leaves many more latents dead in batchtopk)."""
    lr: float = 0.0
    """Learning rate; 0 picks 2e-3 / sqrt(n_latents / 16384) for adam and 5e-3 / sqrt(...) for
    schedulefree (sparsify's default for its schedule-free sign descent)."""
    warmup_frac: float = 0.05
    """Fraction of steps with linear LR warm-up."""
    decay_frac: float = 0.2
    """adam: fraction of steps at the end with linear LR decay to 0 (schedulefree needs none)."""
    sparsity_coeff: float = 0.0
    """λ of the sparsity term: L1 for relu, L0 for jumprelu (0 picks a default per arch)."""
    sparsity_warmup_frac: float = 0.1
    """Fraction of steps over which λ rises linearly from 0 (with --target-l0: over which the
    controller's integral part waits, since L0 first dips whatever λ is)."""
    target_l0: float = 0.0
    """jumprelu/relu: reach and hold this L0. Each step uses λ = λ_I · (L0/target)^gain with the
    batch's own L0; λ_I starts at --sparsity-coeff (or the default), integrates log(L0/target)
    after the warm-up, and is saved in the SAE config. 0 keeps the fixed λ schedule with warm-up.
    For jumprelu also pass --threshold-lr-scale 10 --dense-aux --reopen-dead: without them its L0
    collapses early and latents pushed below θ stay dead."""
    l0_control_rate: float = 0.2
    """Integral gain of the target-L0 controller: its slow part λ_I changes by at most a factor
    e^rate per step (reached when L0 is a factor e or more off the target)."""
    l0_control_gain: float = 1.0
    """Proportional gain: a step uses λ_I · (L0/target)^gain with this batch's L0 (clamped to ±1 in
    log)."""
    aux_coeff: float = 1 / 32
    """Weight of the AuxK dead-latent loss (TopK family; jumprelu/relu with --dense-aux)."""
    dense_aux: bool = False
    """Also apply AuxK to jumprelu/relu: their dead latents (below threshold) get no other
    gradient."""
    jumprelu_bandwidth: float = 0.05
    """jumprelu: width ε of the straight-through kernel, in the units of the normalised
    pre-activations (inputs are scaled so that E‖x‖ = √d_model)."""
    reopen_dead: bool = False
    """jumprelu: put a dead latent's θ back at the (1 − k/n) quantile of its pre-activations on the
    current batch (the initial rule), so that what AuxK taught it can show; below θ nothing else
    reaches it."""
    threshold_lr_scale: float = 1.0
    """jumprelu: the threshold's (log θ) learning rate is this × the LR of the other weights (at 1,
    θ moves far less per step than the encoder moves a pre-activation)."""
    dead_tokens: int = 0
    """A latent that has not fired in this many tokens counts as dead (and gets the AuxK loss). 0: a
    fifth of the run's tokens, at most 1M (a fixed 1M would never trigger AuxK in runs of 1M tokens
    or fewer)."""
    outlier_ratio: float = 10.0
    """Rows with a norm above this × the median norm (massive activations) are skipped and passed
    through at inference; 0 keeps every row."""
    checkpoint_every: int = 100
    """Steps between checkpoints (a checkpoint is also written at the end)."""
    log_every: int = 10
    """Steps between metric rows."""
    resume: bool = False
    """Continue from out/checkpoint.safetensors exactly where it stopped; with no checkpoint there
    yet, start from scratch (so the same command can always be re-issued after a kill)."""
    seed: int = 0
    """Seed of the data order and the initial weights."""
    wandb: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode (offline writes under out/wandb)."""
    device: str = "auto"
    """Device to train on: cpu, cuda, cuda:N, or auto (cuda when there is one)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype of the SAE's matmuls (under torch.autocast); weights, optimizer state and the
    loss stay float32. auto: bfloat16 on CUDA, float32 on CPU (where bf16 is several times
    slower)."""
    model: str = ""
    """Model spec the store must have been harvested from (checked before training: d_model,
    hooks, family, weights); empty: no check."""

    def __post_init__(self) -> None:
        # "auto" becomes the device it means now, so every reader of cfg.device gets a real one
        # (and a device that is not here fails at once).
        self.device = str(resolve_device(self.device))
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(
                f"unknown --dtype {self.dtype!r} for training; use auto, float32 or bfloat16 "
                "(float16 would need loss scaling)"
            )


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    """cfg.dtype with "auto" resolved for cfg.device: bfloat16 on CUDA, float32 on CPU."""
    return resolve_dtype(cfg.dtype, torch.device(cfg.device))


def optimizer_name(cfg: TrainConfig) -> OptimizerName:
    """cfg.optimizer with "auto" resolved: schedule-free for topk, Adam for the others."""
    if cfg.optimizer == "auto":
        return "schedulefree" if cfg.arch == "topk" else "adam"
    return cfg.optimizer


def base_lr(cfg: TrainConfig, n_latents: int) -> float:
    """cfg.lr, or the optimizer's default for this width when it is 0."""
    return cfg.lr or default_lr(n_latents, optimizer_name(cfg))


def lr_decay_frac(cfg: TrainConfig) -> float:
    """cfg.decay_frac for Adam; 0 for schedule-free, whose averaged weights play the decay's
    part."""
    return cfg.decay_frac if optimizer_name(cfg) == "adam" else 0.0
