"""Co-activation statistics of a store (graphs.coactivation): against a dense reference, disjoint
slices, a killed run that resumes to the same result, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import graphs.coactivation as coactivation
from graphs.coactivation import CHECKPOINT, StatsConfig, coactivation_stats
from graphs.coactivation_scores import CoactivationStats
from sae.cli import field_docs
from sae.io import load_sae, save_sae
from sae.sae import SAE, SAEConfig
from sae.store import ActivationStore
from tests.graphs.coactivation_reference import (
    assert_same_counts,
    dense_reference,
)

HOOK = "blocks.1.hook_resid_post"


def save_random_sae(store: ActivationStore, directory: Path, **overrides) -> Path:
    """A random batchtopk SAE over HOOK: θ at the 85th percentile gives a variable L0 (~7 of 48);
    max_input_norm at the 97th percentile of row norms makes some rows pass through uncoded."""
    x = store.rows(torch.arange(len(store)), hooks=[HOOK])[HOOK]  # [N, d_model]
    fields = dict(
        d_in=store.d_model,
        n_latents=48,
        arch="batchtopk",
        k=6,
        hook=HOOK,
        model=store.manifest.model,
        weights_sha256=store.manifest.weights_sha256,
        max_input_norm=float(x.norm(dim=1).quantile(0.97)),
    )
    fields.update(overrides)
    sae = SAE(SAEConfig(**fields))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        pre = sae.pre_acts(x[:, : sae.cfg.d_in] * sae.cfg.input_scale)
        sae.threshold.fill_(pre.flatten().quantile(0.85).item())
    return save_sae(sae, directory)


def config(store: ActivationStore, sae_dir: Path, out: Path, **overrides) -> StatsConfig:
    fields = dict(
        store=str(store.directory),
        sae=str(sae_dir),
        out=str(out),
        batch_size=200,
        checkpoint_every=3,
        m=4,
    )
    fields.update(overrides)
    return StatsConfig(**fields)


def test_store_stats_match_a_dense_reference(tiny_store: ActivationStore, tmp_path: Path) -> None:
    sae_dir = save_random_sae(tiny_store, tmp_path / "sae")
    stats = coactivation_stats(config(tiny_store, sae_dir, tmp_path / "out"))
    sae = load_sae(sae_dir)
    x = tiny_store.rows(torch.arange(len(tiny_store)), hooks=[HOOK])[HOOK]
    code = sae.encode(x)  # all rows at once: batching must not change the counts
    passthrough = int(sae.passthrough(x).sum())
    assert 0 < passthrough < len(x) and len(code.cols.unique()) > 20
    assert stats.n_tokens == len(x) - passthrough
    assert_same_counts(stats, *dense_reference(code, 48))
    loaded = CoactivationStats.load(tmp_path / "out")
    assert_same_counts(loaded, stats.feature_counts, stats.pair_index, stats.pair_counts)
    info = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert info["format_version"] == 1 and info["complete"] and info["hook"] == HOOK
    assert (info["n_tokens"], info["n_latents"], info["n_passthrough"]) == (
        stats.n_tokens,
        48,
        passthrough,
    )
    assert info["config"]["m"] == 4 and info["sae"] == str(sae_dir.resolve())
    candidates = load_file(tmp_path / "out" / "candidates.safetensors")
    edges, scores = stats.candidates(4, "npmi", 5)
    assert (
        candidates["edge_index"].equal(edges)
        and candidates["scores"].equal(scores)
        and len(scores) > 0
    )
    assert not (tmp_path / "out" / CHECKPOINT).exists()


def test_disjoint_slices_add_up_to_the_whole(tiny_store: ActivationStore, tmp_path: Path) -> None:
    sae_dir = save_random_sae(tiny_store, tmp_path / "sae")
    whole = coactivation_stats(config(tiny_store, sae_dir, tmp_path / "whole"))
    cut = 1000
    first = coactivation_stats(config(tiny_store, sae_dir, tmp_path / "first", tokens=cut))
    rest = coactivation_stats(config(tiny_store, sae_dir, tmp_path / "rest", skip_tokens=cut))
    assert first.n_tokens + rest.n_tokens == whole.n_tokens and 0 < first.n_tokens < whole.n_tokens
    assert torch.equal(first.feature_counts + rest.feature_counts, whole.feature_counts)
    with pytest.raises(ValueError, match="skip-tokens"):
        coactivation_stats(
            config(tiny_store, sae_dir, tmp_path / "bad", skip_tokens=len(tiny_store))
        )


class Killed(Exception):
    pass


@pytest.mark.parametrize("residual", [False, True])
def test_a_killed_run_resumes_to_the_same_result(
    tiny_store: ActivationStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, residual: bool
) -> None:
    sae_dir = save_random_sae(tiny_store, tmp_path / "sae")
    reference = coactivation_stats(config(tiny_store, sae_dir, tmp_path / "ref", residual=residual))
    assert reference.has_residual == residual
    if residual:
        assert int(reference.miss_pair_counts.sum()) > 0
    n_batches = math.ceil(len(tiny_store) / 200)
    encode, calls, kill_at = coactivation._encode, [], [8]

    def encode_or_die(sae, x, miss_k=0):  # the run is killed while encoding its 8th batch
        calls.append(len(x))
        if len(calls) == kill_at[0]:
            raise Killed
        return encode(sae, x, miss_k)

    monkeypatch.setattr(coactivation, "_encode", encode_or_die)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        coactivation_stats(config(tiny_store, sae_dir, run, residual=residual))
    kill_at[0] = 0
    with safe_open(run / CHECKPOINT, framework="pt") as f:
        assert json.loads(f.metadata()["greylens"])["batches_done"] == 6  # the last multiple of 3
    assert not (run / "stats.json").exists()
    with pytest.raises(
        ValueError, match=r"other inputs or settings \(min_count: .* has 5, this run 2\)"
    ):
        coactivation_stats(config(tiny_store, sae_dir, run, min_count=2, residual=residual))
    calls.clear()
    # checkpoint_every does not change results, and --hook naming the SAE's own hook is the default
    resumed = coactivation_stats(
        config(tiny_store, sae_dir, run, checkpoint_every=4, hook=HOOK, residual=residual)
    )
    assert len(calls) == n_batches - 6  # nothing repeated, nothing lost
    assert resumed.n_tokens == reference.n_tokens
    assert_same_counts(
        resumed, reference.feature_counts, reference.pair_index, reference.pair_counts
    )
    for name in ("stats.safetensors", "candidates.safetensors"):
        ours, theirs = load_file(run / name), load_file(tmp_path / "ref" / name)
        assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
    calls.clear()
    # finished: loaded, not recounted
    again = coactivation_stats(config(tiny_store, sae_dir, run, residual=residual))
    assert calls == [] and again.pair_counts.equal(reference.pair_counts)
    if residual:
        assert again.miss_pair_counts.equal(reference.miss_pair_counts)
    with pytest.raises(ValueError, match="m: .* has 4, this run 8"):
        coactivation_stats(config(tiny_store, sae_dir, run, m=8, residual=residual))
    other = (
        "residual: .* has True, this run None"
        if residual
        else "residual: .* has None, this run True"
    )
    with pytest.raises(ValueError, match=other):  # stats with and without --residual never mix
        coactivation_stats(config(tiny_store, sae_dir, run, residual=not residual))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(store=""), "pass --store DIR"),
        (dict(store="missing"), "is not an activation store"),
        (dict(sae="missing"), "holds no sae.safetensors"),
        (dict(hook="blocks.7.hook_resid_post"), "store has no hook 'blocks.7.hook_resid_post'"),
        (dict(tokens=10**9), "more than the store holds"),
        (dict(batch_size=0), "--batch-size must be at least 1"),
        (dict(score="cosine"), "unknown --score"),
        (dict(score="residual"), "pass --residual to count them"),
        (dict(residual=True, miss_k=0), "--miss-k must be at least 1"),
        (dict(sae_d_in=32), "SAE reads d_in 32 but the store holds d_model"),
        (dict(sae_weights_sha256="0" * 64), "use a store of the SAE's model"),
        (dict(sae_model="gpt2", sae_weights_sha256=""), "trained on activations of gpt2"),
    ],
)
def test_bad_inputs_are_refused_before_any_work(
    tiny_store: ActivationStore, tmp_path: Path, change: dict, message: str
) -> None:
    sae_change = {k.removeprefix("sae_"): v for k, v in change.items() if k.startswith("sae_")}
    sae_dir = save_random_sae(tiny_store, tmp_path / "sae", **sae_change)
    cfg = config(tiny_store, sae_dir, tmp_path / "out")
    for key, value in change.items():
        if not key.startswith("sae_"):
            setattr(cfg, key, str(tmp_path / value) if key in ("store", "sae") and value else value)
    with pytest.raises(ValueError, match=message):
        coactivation_stats(cfg)
    assert not (tmp_path / "out").exists()


def test_every_config_field_has_help_text() -> None:
    assert set(field_docs(StatsConfig)) == set(StatsConfig.__dataclass_fields__)
