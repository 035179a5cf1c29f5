"""Data-parallel helpers: this process's rank and world, and the collectives training needs.

Every rank reads the same global batch and trains on its own contiguous slice; losses use global
denominators and gradients are summed, so N ranks take exactly the step one process would take on
the whole batch. With world 1 every collective is the identity, so single-process training runs
the same code without a process group.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as torch_dist


class Distributed(NamedTuple):
    """This process's place among data-parallel ranks (world 1: plain single-process training)."""

    rank: int = 0
    world: int = 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over all ranks, in place; returns it."""
        if self.world > 1:
            torch_dist.all_reduce(tensor)
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor (same shape on all), concatenated along dim 0 in rank order."""
        if self.world == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        torch_dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch: [N, ...] -> [N / world, ...]."""
        size = batch.shape[0] // self.world
        return batch[self.rank * size : (self.rank + 1) * size]
