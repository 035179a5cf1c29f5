"""The planted hierarchy the evaluation tests share."""

from __future__ import annotations

import pytest
import torch

from graphs.eval.planted import PlantedHierarchy, PlantedHierarchyConfig


@pytest.fixture(scope="module")
def planted() -> PlantedHierarchy:
    return PlantedHierarchy.build(PlantedHierarchyConfig(seed=1))


@pytest.fixture(scope="module")
def codes(planted: PlantedHierarchy) -> torch.Tensor:
    return planted.sample(30_000, torch.Generator().manual_seed(5))[1]  # [30000, n_true]
