"""The planted hierarchy (graphs.eval.planted): its generative model and its activation store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graphs.eval.planted import (
    DEFAULT_HOOK,
    PlantedHierarchy,
    PlantedHierarchyConfig,
    hierarchy_from_store,
    shard_seed,
    store_codes,
    write_store,
)
from graphs.eval.recovery import oracle_stats
from sae.store import ActivationStore, StoreError

# ------------------------------------------------------------------------------ generative model


def test_a_child_never_fires_without_its_parent_and_siblings_are_capped() -> None:
    cfg = PlantedHierarchyConfig(
        children_per_parent=3, max_active_children=2, child_prob_given_parent=0.9, seed=2
    )
    h = PlantedHierarchy.build(cfg)
    x, codes = h.sample(20_000, torch.Generator().manual_seed(0))
    active = codes > 0
    child, parent = h.edge_index
    assert (codes >= 0).all() and x.dtype == codes.dtype == torch.float32
    assert active[:, child].any()  # children do fire, so the next line tests something
    assert not (active[:, child] & ~active[:, parent]).any()  # child ⇒ parent, exactly
    # [n, P]
    siblings = active[:, cfg.n_parents : cfg.n_parents * 4].reshape(-1, cfg.n_parents, 3).sum(-1)
    assert siblings.max() == 2 and (siblings == 2).any()
    assert abs(active[:, : cfg.n_parents].float().mean() - cfg.parent_prob) < 0.005
    one_child = PlantedHierarchy.build(PlantedHierarchyConfig(seed=2)).sample(20_000)[1] > 0
    assert one_child[:, 32:128].reshape(-1, 32, 3).sum(-1).max() == 1  # default: at most one child


def test_x_is_the_codes_through_the_dictionary_plus_noise(planted: PlantedHierarchy) -> None:
    x, codes = planted.sample(4000, torch.Generator().manual_seed(3))
    residual = x - codes @ planted.dictionary  # [4000, d]
    assert abs(residual.std() - planted.config.noise_std) < 0.002
    assert 3 < (codes > 0).sum(1).float().mean() < 6  # L0 of the default mix ≈ 4.2


def test_cooc_pairs_fire_together_and_unrelated_free_features_do_not(
    planted: PlantedHierarchy, codes: torch.Tensor
) -> None:
    stats = oracle_stats(planted, codes)
    assert stats.cooc.min() > 0.8  # ≈ cooc_prob + free_prob
    free = torch.arange(128, 192)
    cond = stats.conditional[free][:, free].clone()
    cond.fill_diagonal_(0)
    cond[planted.cooc_edge_index[0] - 128, planted.cooc_edge_index[1] - 128] = 0
    assert cond.max() < 0.1


def test_build_and_sample_are_deterministic_per_seed(planted: PlantedHierarchy) -> None:
    again = PlantedHierarchy.build(PlantedHierarchyConfig(seed=1))
    other = PlantedHierarchy.build(PlantedHierarchyConfig(seed=2))
    assert torch.equal(planted.dictionary, again.dictionary) and torch.equal(
        planted.edge_index, again.edge_index
    )
    assert torch.equal(planted.cooc_edge_index, again.cooc_edge_index)
    assert not torch.allclose(planted.dictionary, other.dictionary)
    assert not torch.equal(planted.cooc_edge_index, other.cooc_edge_index)
    assert planted.weights_sha256() == again.weights_sha256() != other.weights_sha256()
    a, b = (
        planted.sample(500, torch.Generator().manual_seed(9)),
        again.sample(500, torch.Generator().manual_seed(9)),
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # no generator: seeded by cfg
    assert torch.equal(planted.sample(100)[0], planted.sample(100)[0])


def test_edges_dictionary_and_config_checks(planted: PlantedHierarchy) -> None:
    child, parent = planted.edge_index
    assert planted.edge_index.shape == (2, 96) and (parent < 32).all() and (child >= 32).all()
    assert torch.equal(planted.parent_of[child], parent) and (planted.parent_of[:32] == -1).all()
    assert planted.cooc_edge_index.shape == (2, 16) and (planted.cooc_edge_index >= 128).all()
    assert torch.allclose(planted.dictionary.norm(dim=1), torch.ones(192), atol=1e-5)
    assert planted.max_cosine() < 0.2  # documented ≈ 0.16
    assert PlantedHierarchy.build(PlantedHierarchyConfig(decorrelate_steps=0)).max_cosine() > 0.35
    tilted = PlantedHierarchy.build(PlantedHierarchyConfig(parent_child_cos=0.5))
    cos = (tilted.dictionary[child] * tilted.dictionary[parent]).sum(1)
    assert torch.allclose(cos, torch.full_like(cos, 0.5), atol=1e-5)
    with pytest.raises(ValueError, match="max_active_children"):
        PlantedHierarchyConfig(max_active_children=4)
    with pytest.raises(ValueError, match="n_cooc"):
        PlantedHierarchyConfig(n_free=10, n_cooc=6)


# ------------------------------------------------------------------------------ activation store


def test_store_round_trips_and_rebuilds_its_ground_truth(
    planted: PlantedHierarchy, tmp_path: Path
) -> None:
    store = write_store(
        planted, tmp_path / "s", n_tokens=2500, seed=7, shard_tokens=1000, context_size=64
    )
    m = ActivationStore(tmp_path / "s").manifest
    assert (m.model, m.hooks, m.d_model, m.complete, m.n_tokens) == (
        "synthetic",
        [DEFAULT_HOOK],
        64,
        True,
        2500,
    )
    assert [s.n_tokens for s in m.shards] == [
        1000,
        1000,
        500,
    ] and m.weights_sha256 == planted.weights_sha256()
    rows = store.rows(torch.arange(2500))
    x1 = planted.sample(1000, torch.Generator().manual_seed(shard_seed(7, 1)))[0]
    assert torch.equal(rows[DEFAULT_HOOK][1000:2000], x1)
    codes = store_codes(planted, store)  # [2500, n_true]
    assert (rows[DEFAULT_HOOK] - codes @ planted.dictionary).std() < 0.03
    strongest = torch.where(codes.amax(1) > 0, codes.argmax(1) + 1, 0)  # 0: nothing fired
    assert (
        torch.equal(rows["token_ids"].long(), strongest)
        and (strongest == 0).any()
        and (strongest > 0).any()
    )
    assert rows["positions"].min() == 1 and rows["positions"].max() == 63
    assert torch.equal(rows["doc_ids"].long(), torch.arange(2500) // 63)
    batches = list(store.batches(256, seed=0))
    assert sum(len(b["token_ids"]) for b in batches) == 2500
    assert torch.allclose(
        sum(b[DEFAULT_HOOK].sum(0) for b in batches), rows[DEFAULT_HOOK].sum(0), atol=1e-3
    )
    assert torch.equal(hierarchy_from_store(tmp_path / "s").dictionary, planted.dictionary)


def test_store_resumes_refuses_mismatches_and_checks_codes(
    planted: PlantedHierarchy, tmp_path: Path
) -> None:
    first = write_store(planted, tmp_path / "s", n_tokens=600, shard_tokens=256)
    shas = [s.sha256 for s in first.manifest.shards]
    again = write_store(planted, tmp_path / "s", n_tokens=600, shard_tokens=256)
    assert [s.sha256 for s in again.manifest.shards] == shas  # a complete store is left as it is
    with pytest.raises(StoreError, match="different harvest"):
        write_store(planted, tmp_path / "s", n_tokens=700, shard_tokens=256)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        write_store(planted, tmp_path / "junk", n_tokens=10)
    other = PlantedHierarchy.build(PlantedHierarchyConfig(seed=3))
    with pytest.raises(StoreError, match="does not match"):
        store_codes(other, first)


def test_the_sae_trainer_reads_a_synthetic_store(planted: PlantedHierarchy, tmp_path: Path) -> None:
    from sae.train import TrainConfig, train

    store = write_store(planted, tmp_path / "s", n_tokens=2048, shard_tokens=1024, dtype="float16")
    # float16 rounding stays within tolerance
    assert store_codes(planted, store).shape == (
        2048,
        192,
    )
    cfg = TrainConfig(
        store=str(store.directory),
        out=str(tmp_path / "sae"),
        k=8,
        expansion=4,
        tokens=256 * 8,
        batch_size=256,
        lr=3e-3,
        wandb="disabled",
        log_every=4,
    )
    sae = train(cfg)[DEFAULT_HOOK]
    assert (sae.cfg.model, sae.cfg.d_in, sae.cfg.n_latents) == ("synthetic", 64, 256)
    assert sae.cfg.weights_sha256 == planted.weights_sha256()
