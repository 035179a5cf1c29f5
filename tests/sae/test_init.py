"""Data-dependent initialisation of an SAE."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sae.init import geometric_median, init_sae
from sae.store import ActivationStore
from tests.sae.conftest import HOOK, train_config


def test_geometric_median_minimises_the_sum_of_distances() -> None:
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 10.0]])
    median = geometric_median(points)
    cost = lambda y: (points - y).norm(dim=1).sum()  # noqa: E731
    for delta in ([1e-2, 0], [0, 1e-2], [-1e-2, 0], [0, -1e-2]):
        assert cost(median) <= cost(median + torch.tensor(delta))
    assert median.norm() < points.mean(0).norm()  # robust to the outlier, unlike the mean


def test_init_sae_scales_inputs_centres_b_dec_and_starts_dense_archs_near_k(
    tiny_store: ActivationStore,
) -> None:
    x = tiny_store.rows(torch.arange(len(tiny_store)), hooks=[HOOK])[HOOK]
    topk = init_sae(train_config(tiny_store, Path("unused")), tiny_store, HOOK)
    x_n = x[~topk.passthrough(x)] * topk.cfg.input_scale
    assert x_n.norm(dim=1).mean() == pytest.approx(math.sqrt(tiny_store.d_model), rel=0.05)
    torch.testing.assert_close(topk.W_dec.norm(dim=1), torch.ones(topk.cfg.n_latents))
    assert torch.equal(topk.W_enc, topk.W_dec)  # the encoder starts as the decoder's transpose
    # b_dec: the geometric median is closer to the data, in summed distance, than the mean
    cost = lambda y: (x_n - y).norm(dim=1).sum()  # noqa: E731
    assert cost(topk.b_dec.detach()) <= cost(x_n.mean(0))
    jumprelu = init_sae(train_config(tiny_store, Path("unused"), arch="jumprelu"), tiny_store, HOOK)
    assert jumprelu.encode(x).l0() == pytest.approx(8, rel=0.25)  # k = 8 active at the start
