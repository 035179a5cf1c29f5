"""JumpReLU's straight-through estimators (Rajamanoharan et al. 2024).

H(pre − θ) has no gradient in θ; the estimators replace its derivative with a rectangle kernel K
of width ε (`jumprelu_bandwidth`) around the threshold, so θ learns from the tokens whose
pre-activation lies within ε/2 of it. pre: [N, n_latents], θ: [n_latents].
"""

from __future__ import annotations

import torch


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """pre · H(pre − θ); dθ by the straight-through estimator −(θ/ε) K((pre − θ)/ε)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        grad_threshold = (-(threshold / eps) * _rectangle((pre - threshold) / eps) * grad).sum(0)
        return grad_pre, grad_threshold, None


class StepL0(torch.autograd.Function):
    """H(pre − θ) for the L0 penalty; dθ by the straight-through estimator −(1/ε) K((pre − θ)/ε)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = (-(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad).sum(0)
        return None, grad_threshold, None
