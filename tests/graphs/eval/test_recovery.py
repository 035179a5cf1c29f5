"""Edge recovery against the planted hierarchy (graphs.eval.recovery): matching, scores, oracles."""

from __future__ import annotations

import pytest
import torch

from graphs.eval.planted import PlantedHierarchy
from graphs.eval.recovery import edge_recovery, implied_edges, match_latents, oracle_stats


def _shuffled_decoder(
    planted: PlantedHierarchy, n_extra: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder holding every true direction (plus noise) at a random row, among random extras.

    Returns (W_dec [n_true + n_extra, d], latent_of [n_true]: the row that holds each feature)."""
    g = torch.Generator().manual_seed(11)
    n, d = planted.dictionary.shape
    rows = torch.cat(
        [
            planted.dictionary + 0.02 * torch.randn(n, d, generator=g),
            torch.randn(n_extra, d, generator=g),
        ]
    )
    perm = torch.randperm(n + n_extra, generator=g)  # rows[i] goes to W_dec[perm[i]]
    W_dec = torch.empty_like(rows)
    W_dec[perm] = rows
    return W_dec, perm[:n]


def test_match_latents_finds_a_permuted_dictionary(planted: PlantedHierarchy) -> None:
    W_dec, latent_of = _shuffled_decoder(planted)
    match = match_latents(W_dec, planted.dictionary)
    assert torch.equal(match.latent, latent_of) and match.cos.min() > 0.95
    greedy = match_latents(W_dec, planted.dictionary, one_to_one=False)
    assert torch.equal(greedy.latent, latent_of)
    with pytest.raises(ValueError, match="transpose"):
        match_latents(W_dec.T, planted.dictionary)


def test_one_to_one_matching_never_shares_a_latent() -> None:
    e = torch.eye(3)
    # one latent halfway between features 0 and 1
    W_dec = torch.stack([(e[0] + e[1]) / 2**0.5, e[2]])
    shared = match_latents(W_dec, e[:2], one_to_one=False)
    assert shared.latent.tolist() == [0, 0]
    distinct = match_latents(W_dec, e[:2])
    assert sorted(distinct.latent.tolist()) == [0, 1] and distinct.cos.min() < 0.1
    # fewer latents than features
    assert match_latents(W_dec[:1], e[:2]).latent.tolist().count(-1) == 1


def test_edge_recovery_is_perfect_for_the_planted_edges_and_chance_for_the_null(
    planted: PlantedHierarchy,
) -> None:
    W_dec, latent_of = _shuffled_decoder(planted)
    learned = latent_of[planted.edge_index]  # [2, 96] the planted edges, in latent indices
    r = edge_recovery(learned, torch.ones(96), W_dec, planted)
    assert (r["precision"], r["recall"], r["f1"], r["n_mapped"], r["reversed"]) == (
        1.0,
        1.0,
        1.0,
        96.0,
        0.0,
    )
    assert r["n_matched_features"] == 192 and r["n_learned"] == 96
    # a shuffled target is the right parent 1 time in 32
    assert abs(r["null_precision"] - 1 / 32) < 0.015
    assert r["null_f1"] < 0.1


def test_edge_recovery_counts_what_it_should(planted: PlantedHierarchy) -> None:
    W_dec, latent_of = _shuffled_decoder(planted)
    child, parent = planted.edge_index
    empty = edge_recovery(torch.empty(2, 0, dtype=torch.int64), torch.empty(0), W_dec, planted)
    assert (empty["precision"], empty["recall"], empty["f1"], empty["n_mapped"]) == (
        0.0,
        0.0,
        0.0,
        0.0,
    )
    backwards = edge_recovery(latent_of[planted.edge_index.flip(0)], torch.ones(96), W_dec, planted)
    assert (backwards["precision"], backwards["recall"], backwards["reversed"]) == (0.0, 0.0, 96.0)
    half = torch.arange(96) % 2 == 0
    # odd edges point at the next parent
    wrong_parent = torch.where(half, parent, (parent + 1) % 32)
    mixed = edge_recovery(
        latent_of[torch.stack([child, wrong_parent])], torch.ones(96), W_dec, planted
    )
    assert (mixed["precision"], mixed["recall"]) == (0.5, 0.5)
    # 0 weight: dropped
    weak = edge_recovery(latent_of[planted.edge_index], half.float(), W_dec, planted)
    assert (weak["precision"], weak["recall"], weak["n_learned"]) == (1.0, 0.5, 48.0)
    cooc = edge_recovery(latent_of[planted.cooc_edge_index], torch.ones(16), W_dec, planted)
    assert (cooc["precision"], cooc["cooc_hits"]) == (0.0, 16.0)
    unmatched = edge_recovery(planted.edge_index, torch.ones(96), torch.randn(192, 64), planted)
    assert unmatched["n_matched_features"] == 0 and unmatched["recall"] == 0.0  # cos < min_cos
    with pytest.raises(ValueError, match=r"\[E\]"):
        edge_recovery(planted.edge_index, torch.ones(95), W_dec, planted)


def test_oracle_sees_the_planted_implications(
    planted: PlantedHierarchy, codes: torch.Tensor
) -> None:
    stats = oracle_stats(planted, codes)
    assert torch.equal(stats.child_to_parent, torch.ones(96))  # P(parent | child) = 1
    assert stats.parent_to_child.max() < 0.4  # ≈ 0.7 / 3: the reverse edge is not implied
    assert abs(stats.freq[:32].mean() - 0.05) < 0.005
    found = implied_edges(codes)
    r = edge_recovery(found, torch.ones(found.shape[1]), planted.dictionary, planted)
    assert (r["precision"], r["recall"]) == (1.0, 1.0)
