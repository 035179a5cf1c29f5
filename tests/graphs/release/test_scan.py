"""The streamed passes (graphs.release.scan): statistics and contexts against a dense reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graphs.release import load_release
from graphs.release.scan import KeepBest
from sae.io import load_sae
from tests.graphs.conftest import SOURCE_HOOK, TinyGraph


@pytest.fixture(scope="module")
def dense(tiny_graph: TinyGraph) -> torch.Tensor:
    """[n_tokens, n_latents] the SAE's code of the whole tiny store, computed in one go."""
    sae = load_sae(tiny_graph.sae_dirs / SOURCE_HOOK)
    x = tiny_graph.store.rows(torch.arange(len(tiny_graph.store)), hooks=[SOURCE_HOOK])[SOURCE_HOOK]
    return sae.encode(x).to_dense(sae.cfg.n_latents)


def test_keep_best_equals_a_full_sort() -> None:
    torch.manual_seed(0)
    n, k, table = 7, 3, KeepBest(7, 3)
    cols, keys = torch.randint(0, n, (200,)), torch.rand(200)
    for chunk in torch.arange(200).split(37):  # streamed in uneven batches
        table.update(cols[chunk], keys[chunk], chunk, keys[chunk])
    for f in range(n):
        expected = keys[cols == f].sort(descending=True).values[:k]
        assert torch.equal(table.keys[f, : len(expected)].float(), expected)
        assert torch.equal(keys[table.rows[f, : len(expected)]], expected)


def test_streamed_statistics_match_the_dense_code(tiny_release: Path, dense: torch.Tensor) -> None:
    features = load_release(tiny_release).data["features"].to_dict()
    fired = (dense > 0).sum(0)  # [n]
    assert features["fire_count"] == fired.tolist()
    assert torch.allclose(
        torch.tensor(features["density"], dtype=torch.float64), fired.double() / len(dense)
    )
    assert torch.allclose(torch.tensor(features["max_activation"]), dense.max(0).values, atol=1e-5)
    mean = dense.sum(0) / fired.clamp_min(1)
    assert torch.allclose(torch.tensor(features["mean_activation"]), mean, atol=1e-4)
    # every activation lands in a bin
    assert [sum(h) for h in features["hist_counts"]] == fired.tolist()
    assert features["dead"] == (fired == 0).tolist()


def test_contexts_hold_token_level_activations(tiny_release: Path, dense: torch.Tensor) -> None:
    release = load_release(tiny_release)
    for f in (0, 17, 101):
        rows = release.examples_of(f).to_list()
        top = [r for r in rows if r["kind"] == "top"]
        expected = dense[:, f].sort(descending=True).values[: len(top)]
        # the true top-k
        assert torch.allclose(torch.tensor([r["activation"] for r in top]), expected, atol=1e-5)
        for r in rows:
            window = torch.arange(r["row"] - r["focus"], r["row"] - r["focus"] + len(r["tokens"]))
            assert torch.allclose(torch.tensor(r["activations"]), dense[window, f], atol=1e-5)
            assert r["activations"][r["focus"]] == pytest.approx(r["activation"], abs=1e-5)
            assert r["token_ids"] == release_tokens(release, window)
        quantile = [r for r in rows if r["kind"] == "quantile"]
        assert quantile and all(
            r["band_min"] <= r["activation"] <= r["band_max"] and r["activation"] > 0
            for r in quantile
        )
        assert sorted({r["band"] for r in quantile}) == list(range(5))  # every band sampled


def release_tokens(release, window: torch.Tensor) -> list[int]:
    from sae.store import ActivationStore

    store = ActivationStore(release.meta["config"]["store"])
    return store.rows(window, hooks=[])["token_ids"].tolist()
