"""Optimizers for SAE training: Adam (fused) or schedule-free AdamW, their parameter groups, LR.

A group may carry an `lr_scale`: `set_lr` gives it that multiple of the scheduled LR (the
jumprelu threshold uses it to keep up with the encoder).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import schedulefree
import torch
from torch import nn

OptimizerName = Literal["adam", "schedulefree"]
ParamGroup = dict[str, Any]  # torch's param-group dict: "params" plus per-group settings


def default_lr(n_latents: int, optimizer: OptimizerName = "adam") -> float:
    """The LR when none is given: 2e-3 for Adam, 5e-3 for schedule-free (sparsify's default for its
    schedule-free sign descent), both × 1/√(n_latents / 16384) so wider SAEs take smaller steps."""
    default = 5e-3 if optimizer == "schedulefree" else 2e-3
    return default / math.sqrt(n_latents / 16384)


def adam(groups: list[ParamGroup], lr: float) -> torch.optim.Adam:
    """Adam, fused into one kernel per step where torch has one (CPU, CUDA): several times faster
    than the default multi-tensor step, as deterministic, and equal to it up to the last bits
    (tests/sae/test_train.py checks exact resume and 2 ranks against 1 with it)."""
    device = groups[0]["params"][0].device
    return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), fused=device.type in ("cpu", "cuda"))


def make_optimizer(
    name: OptimizerName, groups: list[ParamGroup], lr: float
) -> torch.optim.Optimizer:
    """Adam, or schedule-free AdamW (Defazio et al. 2024) with β1 0.95 left in train mode."""
    if name == "adam":
        return adam(groups, lr)
    optimizer = schedulefree.AdamWScheduleFree(groups, lr=lr, betas=(0.95, 0.999))
    # train mode: the parameters hold the point gradients are taken at; .eval() moves them to the
    # average, which is what the run saves at the end
    optimizer.train()
    return optimizer


def param_groups(sae: nn.Module, threshold_lr_scale: float = 1.0) -> list[ParamGroup]:
    """One group, or two when a jumprelu threshold gets its own LR multiplier.

    With Adam a parameter moves by about its LR per step whatever its gradient's size, so at the
    default LR log θ moves far less over a run than one encoder step can shift a pre-activation
    (more than the kernel width): the multiplier lets θ keep up with the encoder."""
    if sae.cfg.arch != "jumprelu" or threshold_lr_scale == 1.0:
        return [{"params": list(sae.parameters()), "lr_scale": 1.0}]
    others = [p for name, p in sae.named_parameters() if name != "log_threshold"]
    return [
        {"params": others, "lr_scale": 1.0},
        {"params": [sae.log_threshold], "lr_scale": threshold_lr_scale},
    ]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every group the scheduled LR times its `lr_scale` (1 when it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def average_weights(optimizer: torch.optim.Optimizer) -> bool:
    """Schedule-free: move the parameters to the averaged point (the trained model); returns
    whether it did. Adam's parameters already are the trained model."""
    if not isinstance(optimizer, schedulefree.AdamWScheduleFree):
        return False
    optimizer.eval()
    return True
