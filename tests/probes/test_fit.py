"""Probe fitting kernels against hand-computed values and eager (dense) references."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch

from probes.activations import Features, Ragged, pool, select_code
from probes.fit import (
    auroc,
    calibrate,
    choose_l2,
    fit_pooled_logistic,
    pooled_code,
    select_features,
)
from probes.probe import Probe, feature_columns
from probes.train import balanced_subset, evaluate_probe, fit_probe, split_calibration
from sae.sae import SparseCode


def ragged(lengths: list[int], width: int, seed: int = 0) -> Ragged:
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *itertools.accumulate(lengths)])
    return Ragged(torch.randn(int(offsets[-1]), width, generator=g), offsets)


def test_pool_matches_hand_values():
    r = Ragged(
        torch.tensor([[1.0], [3.0], [-2.0], [5.0], [4.0], [0.0]]), torch.tensor([0, 2, 3, 6])
    )
    assert pool(r, "mean").squeeze(1).tolist() == [2.0, -2.0, 3.0]
    assert pool(r, "max").squeeze(1).tolist() == [3.0, -2.0, 5.0]  # a negative max survives
    assert pool(r, "last").squeeze(1).tolist() == [3.0, -2.0, 0.0]
    with pytest.raises(ValueError, match="aggregation"):
        pool(r, "median")


def test_select_keeps_texts_in_order():
    r = ragged([2, 3, 1], 4)
    picked = r.select(torch.tensor([2, 0]))
    assert picked.offsets.tolist() == [0, 1, 3]
    assert torch.equal(picked.values, torch.cat([r.values[5:6], r.values[0:2]]))


def random_code(n_rows: int, n_latents: int, per_row: int, seed: int = 0) -> SparseCode:
    g = torch.Generator().manual_seed(seed)
    cols = torch.stack([torch.randperm(n_latents, generator=g)[:per_row] for _ in range(n_rows)])
    rows = torch.arange(n_rows).repeat_interleave(per_row)
    return SparseCode(torch.rand(n_rows * per_row, generator=g) + 0.1, cols.flatten(), rows, n_rows)


@pytest.mark.parametrize("how", ["mean", "max", "last"])
def test_pooled_code_matches_dense_reference(how):
    offsets = torch.tensor([0, 3, 4, 9])
    code = random_code(9, 20, 4)
    dense = code.to_dense(20)
    assert torch.allclose(pooled_code(code, offsets, 20, how), pool(Ragged(dense, offsets), how))


def test_feature_columns_and_select_code_match_dense():
    code = random_code(12, 30, 5, seed=1)
    features = torch.tensor([3, 7, 29])
    assert torch.equal(feature_columns(code, features), code.to_dense(30)[:, features])
    rows = torch.tensor([7, 2, 11])
    assert torch.equal(select_code(code, rows).to_dense(30), code.to_dense(30)[rows])


def test_calibrate_hand_example():
    negatives = torch.arange(1, 11) / 10  # 0.1 .. 1.0
    threshold, info = calibrate(negatives, 0.1)
    assert threshold == pytest.approx(0.9) and info["fpr"] == pytest.approx(0.1)
    threshold, info = calibrate(negatives, 0.0)
    assert threshold == pytest.approx(1.0) and info["fpr"] == 0.0
    threshold, info = calibrate(negatives, 0.25)  # floor(2.5) = 2 negatives may exceed
    assert threshold == pytest.approx(0.8) and info["fpr"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="negatives"):
        calibrate(torch.zeros(0), 0.1)


def test_auroc_hand_example_and_bruteforce_with_ties():
    assert auroc(torch.tensor([0.9, 0.5, 0.5, 0.1]), torch.tensor([1, 1, 0, 0])) == pytest.approx(
        0.875
    )
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40,), generator=g).float()  # many ties
    y = torch.randint(0, 2, (40,), generator=g)
    pos, neg = scores[y == 1], scores[y == 0]
    brute = ((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean()
    assert auroc(scores, y) == pytest.approx(float(brute))


def planted(
    n_texts: int, width: int, seed: int, spike_only: bool = False
) -> tuple[Ragged, torch.Tensor, torch.Tensor]:
    """Texts of 3-8 tokens of noise (std 3); positives carry +12·v on one token (spike_only) or +6·v
    on all."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n_texts,), generator=g).tolist()
    r = ragged(lengths, width, seed)
    v = torch.zeros(width)
    v[0] = 1.0
    y = torch.arange(n_texts) % 2
    values = r.values.clone() * 3 + 10  # an offset and scale that standardisation must undo
    for i in (y == 1).nonzero().squeeze(1).tolist():
        s, e = int(r.offsets[i]), int(r.offsets[i + 1])
        if spike_only:
            values[s + 1] += 12 * v
        else:
            values[s:e] += 6 * v
    return Ragged(values, r.offsets), y, v


@pytest.mark.parametrize("how", ["mean", "max"])
def test_logistic_recovers_planted_direction(how):
    train, y, v = planted(200, 16, seed=0, spike_only=how == "max")
    test, y_test, _ = planted(200, 16, seed=1, spike_only=how == "max")
    w, b = fit_pooled_logistic(train, y, how, l2=1e-3)
    scores = pool(Ragged(test.values @ w + b, test.offsets), how)
    assert ((scores > 0).long() == y_test).float().mean() > 0.9
    assert torch.nn.functional.cosine_similarity(w, v, dim=0) > 0.8


def test_choose_l2_prefers_strong_regularisation_on_noise():
    noise, y, _ = planted(40, 64, seed=2)
    noise = Ragged(torch.randn_like(noise.values), noise.offsets)  # labels carry no signal
    assert choose_l2(noise, y, "mean") >= 1e-1


def planted_code(n_texts: int, seed: int, planted: Callable[[int, int], list[int]]) -> Features:
    """Texts of 4 tokens; token j of text t fires planted(t, j) plus 1-2 noise latents from 10..39,
    each with a value in [1, 2)."""
    g = torch.Generator().manual_seed(seed)
    per_text, n_latents = 4, 40
    rows, cols, values = [], [], []
    for t in range(n_texts):
        for j in range(per_text):
            noise = torch.randint(10, n_latents, (2,), generator=g).unique().tolist()
            for c in planted(t, j) + noise:
                rows.append(t * per_text + j)
                cols.append(c)
                values.append(1.0 + float(torch.rand((), generator=g)))
    order = torch.tensor(rows).argsort(stable=True)
    code = SparseCode(
        torch.tensor(values)[order],
        torch.tensor(cols)[order],
        torch.tensor(rows)[order],
        n_texts * per_text,
    )
    offsets = torch.arange(0, n_texts * per_text + 1, per_text)
    return Features(Ragged(torch.zeros(n_texts * per_text, 4), offsets), code, n_latents)


def co_firing(t: int, j: int) -> list[int]:
    """Positives (odd t) fire latents 3 and 7 on the same token; negatives fire 3 and 7 on
    different tokens, so only the pair on one token (a graph query) tells the classes apart."""
    if j == 1:
        return [3, 7] if t % 2 else [3]
    return [7] if j == 2 and t % 2 == 0 else []


def test_graph_probe_finds_the_co_firing_pair():
    y, y_test = torch.arange(120) % 2, torch.arange(80) % 2
    features, test = planted_code(120, 0, co_firing), planted_code(80, 1, co_firing)
    edges = torch.tensor([[3, 3, 11], [7, 12, 20]])
    probe = fit_probe("graph", features, y, hook="h", aggregation="max", edges=edges, sae="x")
    assert probe.features.tolist() == [3, 7] and probe.edges == [[3, 7]]
    metrics = evaluate_probe(probe, test, y_test)
    assert metrics["auroc"] == 1.0 and metrics["accuracy"] == 1.0
    # either latent alone fires in both classes: a single-feature query is at chance
    alone = fit_probe("graph", features, y, hook="h", aggregation="max", query=[3], sae="x")
    assert abs(evaluate_probe(alone, test, y_test)["auroc"] - 0.5) < 0.15


def marker_latents(t: int, j: int) -> list[int]:
    """Positives (odd t) fire latent 5 on token t % 4 and latent 9 on token (t + 1) % 4 when t % 3
    is not 0; latent 3 fires on token 0 of every text (frequent, but in both classes)."""
    planted = [3] if j == 0 else []
    if t % 2:
        planted += [5] if j == t % 4 else []
        planted += [9] if j == (t + 1) % 4 and t % 3 else []
    return planted


def test_sparse_probe_finds_the_planted_features():
    y, y_test = torch.arange(120) % 2, torch.arange(90) % 2
    features, test = planted_code(120, 0, marker_latents), planted_code(90, 1, marker_latents)
    pooled = pooled_code(features.code, features.acts.offsets, features.n_latents, "max")
    assert select_features(pooled, y, 2).tolist() == [5, 9]
    sparse = fit_probe("sparse", features, y, hook="h", aggregation="max", k=2, sae="x")
    # 5 separates alone, so the fit leans on it (9 gets ~0)
    assert sparse.features.tolist() == [5, 9] and sparse.weight[0] > 1.0
    metrics = evaluate_probe(sparse, test, y_test)
    assert metrics["auroc"] == 1.0 and metrics["accuracy"] == 1.0  # 5 marks every positive
    best_one = fit_probe("sparse", features, y, hook="h", aggregation="max", k=1, sae="x")
    assert best_one.features.tolist() == [5]  # the stronger of the two is kept first
    # the same probe reading latent 9 instead: 9 marks the positives with t % 3 != 0 and no
    # negative, the rest tie with the negatives at 0, so AUROC = f + (1 - f) / 2
    f = float((torch.arange(90)[y_test == 1] % 3 != 0).float().mean())
    nine = Probe(**{**best_one.__dict__, "features": torch.tensor([9])})
    assert evaluate_probe(nine, test, y_test)["auroc"] == pytest.approx(f + (1 - f) / 2)


def test_dense_kinds_and_label_checks():
    train, y, v = planted(120, 8, seed=3)
    linear = fit_probe("linear", Features(train), y, hook="h", aggregation="mean")
    mean_diff = fit_probe("mean_diff", Features(train), y, hook="h", aggregation="mean")
    assert torch.nn.functional.cosine_similarity(mean_diff.direction, v, dim=0) > 0.8
    assert torch.allclose(
        mean_diff.direction,
        pool(train, "mean")[y == 1].mean(0) - pool(train, "mean")[y == 0].mean(0),
    )
    test, y_test, _ = planted(120, 8, seed=4)
    for probe in (linear, mean_diff):
        assert evaluate_probe(probe, Features(test), y_test)["auroc"] > 0.95
    with pytest.raises(ValueError, match="only class"):
        fit_probe("linear", Features(train), torch.zeros_like(y), hook="h", aggregation="mean")
    with pytest.raises(ValueError, match="0 or 1"):
        fit_probe("linear", Features(train), y * 2, hook="h", aggregation="mean")
    with pytest.raises(ValueError, match="encode"):
        fit_probe("sparse", Features(train), y, hook="h", aggregation="mean", sae="x")


def test_split_and_subset_helpers():
    groups = [f"g{i // 3}" for i in range(30)]
    fit, calib = split_calibration(groups, 0.2, seed=0)
    assert {groups[i] for i in fit.tolist()}.isdisjoint({groups[i] for i in calib.tolist()})
    assert len(fit) + len(calib) == 30 and len(calib) == 6
    y = torch.tensor([1] * 5 + [0] * 20)
    picked = balanced_subset(y, 8, seed=0)
    assert picked.numel() == 8 and int(y[picked].sum()) == 4
