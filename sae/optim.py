"""Signum: sign descent with momentum (Bernstein et al. 2018), the optimizer EleutherAI sparsify
trains SAEs with by default.

    m ← β·m + (1 − β)·g        p ← p − lr·sign(m)

Every parameter moves by exactly lr per step (0 where m is 0), whatever its gradient's scale, so
the LR is a step size in parameter units. Its state is one momentum buffer per parameter, kept in
the checkpoint like Adam's moments (resume is exact).
"""

from __future__ import annotations

import torch


class Signum(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.95) -> None:
        if lr <= 0 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"Signum needs lr > 0 and 0 <= momentum < 1, got lr={lr}, momentum={momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch's signature)
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - group["momentum"])  # m ← β·m + (1 − β)·g
                param.add_(buffer.sign(), alpha=-group["lr"])
        return loss
