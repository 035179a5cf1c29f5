"""Shared fixtures: the tiny random model (built in code, seconds) and a small harvested store."""

from __future__ import annotations

from pathlib import Path

import pytest

from sae.harvest import HarvestConfig, harvest
from sae.models import LoadedModel, load_model


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    return load_model("tiny")


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    return load_model("smollm2-135m")


def tiny_harvest_config(out: Path, **overrides) -> HarvestConfig:
    """A small, fast harvest of the tiny model (two hooks, several shards)."""
    fields = dict(
        out=str(out),
        model="tiny",
        hooks="blocks.0.hook_resid_post,blocks.1.hook_resid_post",
        tokens=3000,
        context_size=32,
        shard_tokens=620,
        batch_size=4,
        dtype="float32",
        seed=3,
    )
    fields.update(overrides)
    return HarvestConfig(**fields)


@pytest.fixture(scope="session")
def tiny_store(tiny: LoadedModel, tmp_path_factory: pytest.TempPathFactory):
    return harvest(tiny_harvest_config(tmp_path_factory.mktemp("store") / "s"), tiny)
