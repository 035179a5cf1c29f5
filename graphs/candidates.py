"""Candidate edges from decoder geometry, to join the co-activation candidates.

Why: a child feature that has absorbed its parent ("snake" carrying "starts with s") fires *instead
of* the parent, so the pair rarely co-fires and is never a co-activation candidate — yet it is
exactly the edge the graph step exists for. What betrays it is the decoder: the child's row d_i
keeps a component along the parent's row d_j. So i → j becomes a candidate when cos(d_i, d_j) is
among i's top m and above `min_cos`. Cosine is symmetric, so both directions enter; training (and
the gates) decide which one carries a message.

Cost: the n × n cosine matrix is never held; rows are scored `chunk` at a time (chunk × n floats).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def geometry_candidates(
    W_dec: torch.Tensor, m: int, min_cos: float = 0.1, chunk: int = 1024
) -> torch.Tensor:
    """edge_index [2, E] int64: for each feature i its (at most) m targets j ≠ i with the largest
    cos(d_i, d_j) > min_cos. W_dec: [n, d] decoder rows (normalised here, any norm accepted)."""
    if m < 1:
        raise ValueError(f"m must be at least 1 (got {m})")
    unit = torch.nn.functional.normalize(W_dec.detach().float(), dim=1)
    n = unit.shape[0]
    m = min(m, n - 1)
    sources, targets = [], []
    for start in range(0, n, chunk):
        cos = unit[start : start + chunk] @ unit.T  # [c, n]
        rows = torch.arange(start, start + cos.shape[0])
        cos[torch.arange(cos.shape[0]), rows] = -2.0  # never an edge to itself
        value, column = cos.topk(m, dim=1)  # [c, m]
        keep = value > min_cos
        sources.append(rows[:, None].expand_as(column)[keep])
        targets.append(column[keep])
    return torch.stack([torch.cat(sources), torch.cat(targets)]).long()


def union_edges(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """The distinct edges of two edge_index [2, *] sets, sorted by (source, target)."""
    keys = torch.unique(torch.cat([a[0] * n + a[1], b[0] * n + b[1]]))
    return torch.stack([keys // n, keys % n])
