"""Token means (graphs.token_means): the store pass against a row-by-row loop, the means against
their definition."""

from __future__ import annotations

import torch

from graphs.token_means import token_means, type_statistics
from sae.io import load_sae
from tests.graphs.conftest import SOURCE_HOOK


def test_type_statistics_match_a_row_by_row_loop(tiny_graph):
    store, sae = tiny_graph.store, load_sae(tiny_graph.sae_dirs / SOURCE_HOOK)
    n = 700  # not a multiple of the chunk: the last chunk is partial
    types = type_statistics(sae, store, n, chunk=256)
    rows = store.rows(torch.arange(n), hooks=[SOURCE_HOOK])
    x, ids = rows[SOURCE_HOOK], rows["token_ids"].long()
    for t in ids.unique()[:25].tolist():
        mine = (ids == t).nonzero().squeeze(1)
        u = int(torch.searchsorted(types.type_ids, torch.tensor(t)))
        assert types.type_ids[u] == t and types.counts[u] == len(mine)
        expected = sum(
            (x[r].double() * sae.cfg.input_scale - sae.b_dec.detach().double())
            for r in mine.tolist()
        )
        torch.testing.assert_close(types.sums[u], expected, rtol=1e-9, atol=1e-9)
    code = sae.encode(x)
    assert torch.equal(
        types.fires, torch.bincount(code.cols[code.values > 0], minlength=sae.cfg.n_latents)
    )
    assert types.counts.sum() == n


def test_token_means_are_centred_unit_rows_of_the_type_means():
    sums, counts = torch.randn(6, 4, dtype=torch.float64), torch.tensor([1, 2, 3, 4, 5, 6])
    means = token_means(sums, counts)
    raw = torch.stack([sums[i] / counts[i] for i in range(6)])
    centred = raw - raw.mean(0)
    torch.testing.assert_close(means, (centred / centred.norm(dim=1, keepdim=True)).float())
