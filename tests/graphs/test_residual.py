"""Missed features: the vectorised rule against a per-token loop, and on a planted hierarchy with
simulated absorption, residual candidates find the child → parent edges co-activation cannot."""

from __future__ import annotations

import pytest
import torch

from graphs.eval import PlantedHierarchy, PlantedHierarchyConfig, edge_recovery
from graphs.pair_counter import CoactivationCounter
from graphs.residual import missed_features
from sae.sae import SparseCode


def missed_reference(
    x_n, code: SparseCode, W_dec, b_dec, max_per_token: int
) -> dict[tuple[int, int], float]:
    """The rule of graphs.residual, one token at a time with a dense code: {(token, latent):
    p_tj}."""
    unit = W_dec / W_dec.norm(dim=1, keepdim=True)
    dense = code.to_dense(W_dec.shape[0]).relu()  # [N, n]
    weakest = [float(row[row > 0].min()) for row in dense if bool((row > 0).any())]
    bar = sum(weakest) / len(weakest)  # the batch's mean weakest active value
    out = {}
    for t in range(code.n_rows):
        active = dense[t] > 0
        if not bool(active.any()):
            continue
        proj = (x_n[t] - dense[t] @ W_dec - b_dec) @ unit.T  # [n]
        silent = [(float(proj[j]), j) for j in range(len(proj)) if not bool(active[j])]
        for value, j in sorted(silent, reverse=True)[:max_per_token]:
            if value > bar:
                out[t, j] = value
    return out


@pytest.mark.parametrize("max_per_token", [1, 3, 50])
def test_missed_features_match_a_per_token_loop(max_per_token: int) -> None:
    g = torch.Generator().manual_seed(0)
    n_rows, n, d = 40, 50, 12
    # rows not unit norm
    W_dec, b_dec = (
        torch.randn(n, d, generator=g) * 2,
        torch.randn(d, generator=g) * 0.1,
    )
    x_n = torch.randn(n_rows, d, generator=g) * 3
    per_row = torch.randint(0, 6, (n_rows,), generator=g)  # rows with nothing active miss nothing
    cols = torch.cat([torch.randperm(n, generator=g)[:k] for k in per_row.tolist()])
    rows = torch.arange(n_rows).repeat_interleave(per_row)
    values = torch.randn(len(cols), generator=g).abs() * 0.5
    values[::7] = 0.0  # in the code but not active: such a latent may be missed
    code = SparseCode(values, cols, rows, n_rows)
    missed = missed_features(x_n, code, W_dec, b_dec, max_per_token)
    got = {
        (int(r), int(c)): float(v)
        for r, c, v in zip(missed.rows, missed.cols, missed.values, strict=True)
    }
    want = missed_reference(x_n, code, W_dec, b_dec, max_per_token)
    assert got.keys() == want.keys() and len(got) > 0
    assert all(abs(got[key] - want[key]) < 1e-4 for key in got)
    assert bool((missed.rows[1:] >= missed.rows[:-1]).all())  # row-major like every SparseCode
    assert int(torch.bincount(missed.rows, minlength=n_rows).max()) <= max_per_token
    with pytest.raises(ValueError, match="max_per_token must be at least 1"):
        missed_features(x_n, code, W_dec, b_dec, 0)


def test_residual_candidates_find_absorbed_parents_that_cooccurrence_misses() -> None:
    """Simulated absorption on the planted hierarchy: each child's decoder carries 0.7 of its
    parent's direction, and the code drops the parent wherever one of its children fires. Parent
    and child then never co-fire in the code, so co-activation cannot propose child → parent,
    while the residual left on those tokens points at the parent. The setting is ideal (exact
    codes, no SAE error), and the ranking finds every planted edge (precision = recall = 1.0
    with m = 1 per source); the thresholds, 0.9 each, leave room only for noise. The shuffled
    null is ~0.03, and NPMI candidates of the same count find none (≤ 5% allowed)."""
    planted = PlantedHierarchy.build(PlantedHierarchyConfig(seed=3))
    x, codes = planted.sample(20_000, torch.Generator().manual_seed(1))
    child, parent = planted.edge_index
    W_dec = planted.dictionary.clone()
    W_dec[child] = torch.nn.functional.normalize(
        planted.dictionary[child] + 0.7 * planted.dictionary[parent], dim=1
    )
    absorbed = codes.clone()
    for c, p in zip(child.tolist(), parent.tolist(), strict=True):
        absorbed[codes[:, c] > 0, p] = 0.0
    rows, cols = absorbed.nonzero(as_tuple=True)
    code = SparseCode(absorbed[rows, cols], cols, rows, len(x))
    counter = CoactivationCounter(planted.n_true, residual=True)
    for lo in range(0, len(x), 4096):  # batch by batch, as the stats job counts
        part = (rows >= lo) & (rows < lo + 4096)
        batch = SparseCode(
            code.values[part], code.cols[part], code.rows[part] - lo, len(x[lo : lo + 4096])
        )
        counter.add(
            batch,
            missed=missed_features(x[lo : lo + 4096], batch, W_dec, torch.zeros(x.shape[1]), 8),
        )
    stats = counter.stats()
    edges, scores = stats.candidates(m=1, score="residual", min_count=20)
    found = edge_recovery(edges, scores, W_dec, planted)
    assert found["recall"] >= 0.9 and found["precision"] >= 0.9, found
    assert found["null_precision"] < 0.1 and found["null_recall"] < 0.1, found
    cooc, cooc_scores = stats.candidates(m=32, score="npmi", min_count=20)
    top = cooc_scores.argsort(descending=True)[: edges.shape[1]]
    baseline = edge_recovery(cooc[:, top], cooc_scores[top], W_dec, planted)
    assert baseline["recall"] <= 0.05, baseline
