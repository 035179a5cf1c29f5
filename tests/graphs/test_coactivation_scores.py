"""Co-activation scores (graphs.coactivation_scores): against hand-computed numbers, candidates
against a plain sort."""

from __future__ import annotations

import math

import pytest
import torch

from graphs.coactivation_scores import CoactivationStats
from graphs.pair_counter import CoactivationCounter
from tests.graphs.coactivation_reference import (
    random_code,
)


def test_residual_lift_and_candidates_on_a_hand_example() -> None:
    """N = 10, c = (4, 6, 2, 5), m = (0, 1, 5, 2); misses: 0→2 on 4 tokens, 0→3 on 1, 1→2 on 3,
    3→2 on 2, 1→3 on 1 (c^miss ≥ 2 for min_count 2)."""
    stats = hand_example()
    stats.miss_counts = torch.tensor([0, 1, 5, 2])
    stats.miss_index = torch.tensor([[0, 0, 1, 1, 3], [2, 3, 2, 3, 2]])
    stats.miss_pair_counts = torch.tensor([4, 1, 3, 1, 2])
    lift = [4 / 4 - 0.5, 1 / 4 - 0.2, 3 / 6 - 0.5, 1 / 6 - 0.2, 2 / 5 - 0.5]
    torch.testing.assert_close(stats.residual_lift(), torch.tensor(lift, dtype=torch.float64))
    src, dst, value = stats.directed_scores("residual")  # directed already: each pair once
    assert (
        src.tolist() == [0, 0, 1, 1, 3]
        and dst.tolist() == [2, 3, 2, 3, 2]
        and value.equal(stats.residual_lift())
    )
    edges, scores = stats.candidates(m=2, score="residual", min_count=1)  # lift > 0: 0→2, 0→3
    assert edges.tolist() == [[0, 0], [2, 3]]
    torch.testing.assert_close(scores, torch.tensor([0.5, 0.05]))
    edges, _ = stats.candidates(m=2, score="residual", min_count=2)
    assert edges.tolist() == [[0], [2]]
    with pytest.raises(ValueError, match="recompute them with --residual"):
        hand_example().candidates(score="residual")


def hand_example() -> CoactivationStats:
    """N = 10 tokens; c = (4, 6, 2, 5); c_01 = 2, c_02 = 2, c_03 = 4, c_12 = 1, c_13 = 3."""
    return CoactivationStats(
        n_latents=4,
        n_tokens=10,
        feature_counts=torch.tensor([4, 6, 2, 5]),
        pair_index=torch.tensor([[0, 0, 0, 1, 1], [1, 2, 3, 2, 3]]),
        pair_counts=torch.tensor([2, 2, 4, 1, 3]),
    )


def test_scores_equal_hand_computed_values() -> None:
    stats = hand_example()
    pmi = [
        math.log(2 * 10 / (4 * 6)),
        math.log(2 * 10 / (4 * 2)),
        math.log(4 * 10 / (4 * 5)),
        math.log(1 * 10 / (6 * 2)),
        math.log(3 * 10 / (6 * 5)),
    ]
    npmi = [p / -math.log(c / 10) for p, c in zip(pmi, [2, 2, 4, 1, 3], strict=True)]
    torch.testing.assert_close(stats.pmi(), torch.tensor(pmi, dtype=torch.float64))
    torch.testing.assert_close(stats.npmi(), torch.tensor(npmi, dtype=torch.float64))
    assert stats.npmi()[1].item() == pytest.approx(math.log(2.5) / math.log(5))
    assert stats.pmi()[4].item() == 0
    torch.testing.assert_close(
        stats.jaccard(), torch.tensor([2 / 8, 2 / 4, 4 / 5, 1 / 7, 3 / 8], dtype=torch.float64)
    )
    src, dst, p = stats.conditional()
    assert src.tolist() == [0, 0, 0, 1, 1, 1, 2, 3, 2, 3] and dst.tolist() == [
        1,
        2,
        3,
        2,
        3,
        0,
        0,
        0,
        1,
        1,
    ]
    expected = [2 / 4, 2 / 4, 4 / 4, 1 / 6, 3 / 6, 2 / 6, 2 / 2, 4 / 5, 1 / 2, 3 / 5]
    torch.testing.assert_close(p, torch.tensor(expected, dtype=torch.float64))
    always = CoactivationStats(
        2, 3, torch.tensor([3, 3]), torch.tensor([[0], [1]]), torch.tensor([3])
    )
    assert always.pmi().item() == 0 and always.npmi().item() == 1  # −log p_ij = 0: NPMI's limit


def test_candidates_on_the_hand_example() -> None:
    stats = hand_example()  # positive PMI only for (0, 2): log 2.5 and (0, 3): log 2; (1, 3) has 0
    edges, scores = stats.candidates(m=1, score="pmi", min_count=1)
    assert edges.tolist() == [[0, 2, 3], [2, 0, 0]] and scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor([math.log(2.5)] * 2 + [math.log(2)]))
    edges, _ = stats.candidates(m=2, score="pmi", min_count=1)
    assert edges.tolist() == [[0, 0, 2, 3], [2, 3, 0, 0]]
    edges, scores = stats.candidates(m=2, score="conditional", min_count=1)  # directed: P(j | i)
    assert edges.tolist() == [[0, 0, 2, 3], [3, 2, 0, 0]]
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.5, 1.0, 0.8]))
    edges, _ = stats.candidates(m=2, score="jaccard", min_count=3)  # c_02 = 2 < 3
    assert edges.tolist() == [[0, 3], [3, 0]]
    with pytest.raises(ValueError, match="unknown score"):
        stats.candidates(score="cosine")


@pytest.mark.parametrize("score", ["npmi", "pmi", "jaccard", "conditional"])
def test_candidates_are_the_top_m_by_score(score: str) -> None:
    n, m, min_count = 25, 3, 2
    counter = CoactivationCounter(n)
    counter.add(random_code(n_rows=400, n_latents=n, max_active=8, seed=3))
    stats = counter.stats()
    edges, scores = stats.candidates(m=m, score=score, min_count=min_count)
    src, dst, value = stats.directed_scores(score)
    pair = torch.arange(len(src)) % len(stats.pair_counts)  # directed edge -> its pair
    eligible = (stats.pair_counts[pair] >= min_count) & (stats.pmi()[pair] > 0)
    expected = []
    for i in range(n):
        mine = sorted(
            (-value[e].item(), dst[e].item())
            for e in range(len(src))
            if src[e] == i and eligible[e]
        )
        expected += [(i, j, -v) for v, j in mine[:m]]
    assert 0 < len(expected) < len(src)  # the filters and the cap both bite
    assert list(zip(edges[0].tolist(), edges[1].tolist(), strict=True)) == [
        (i, j) for i, j, _ in expected
    ]
    torch.testing.assert_close(
        scores, torch.tensor([v for _, _, v in expected], dtype=torch.float32)
    )
    assert torch.bincount(edges[0]).max() <= m
