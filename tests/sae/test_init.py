"""Data-dependent initialisation of an SAE."""

from __future__ import annotations

import torch

from sae.init import geometric_median


def test_geometric_median_minimises_the_sum_of_distances() -> None:
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 10.0]])
    median = geometric_median(points)
    cost = lambda y: (points - y).norm(dim=1).sum()  # noqa: E731
    for delta in ([1e-2, 0], [0, 1e-2], [-1e-2, 0], [0, -1e-2]):
        assert cost(median) <= cost(median + torch.tensor(delta))
    assert median.norm() < points.mean(0).norm()  # robust to the outlier, unlike the mean
