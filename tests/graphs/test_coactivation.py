"""Co-activation statistics: counts against a dense codeᵀ·code, scores against hand-computed
numbers, candidates against a plain sort, and a killed run that resumes to the same result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import graphs.coactivation as coactivation
from graphs.coactivation import (
    CHECKPOINT,
    CoactivationCounter,
    CoactivationStats,
    StatsConfig,
    coactivation_stats,
)
from sae.cli import field_docs
from sae.io import load_sae, save_sae
from sae.sae import SAE, SAEConfig, SparseCode
from sae.store import ActivationStore

HOOK = "blocks.1.hook_resid_post"


def dense_reference(
    code: SparseCode, n_latents: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(feature_counts [n], pair_index [2, P], pair_counts [P]) from a dense bool code D: DᵀD."""
    fired = code.values > 0
    # sorted; keeps D small for huge n
    used, compact = torch.unique(code.cols[fired], return_inverse=True)
    dense = torch.zeros(code.n_rows, len(used), dtype=torch.int64)  # [N, u]
    dense[code.rows[fired], compact] = 1
    co = dense.T @ dense  # [u, u]: diagonal = counts, off-diagonal = co-counts
    feature_counts = torch.zeros(n_latents, dtype=torch.int64)
    feature_counts[used] = co.diagonal()
    i, j = torch.triu(co, diagonal=1).nonzero(as_tuple=True)  # row-major, so sorted by (i, j)
    return feature_counts, torch.stack([used[i], used[j]]), co[i, j]


def random_code(n_rows: int, n_latents: int, max_active: int, seed: int) -> SparseCode:
    """Variable active count per row (as batchtopk), latents in no particular order, some values ≤
    0."""
    g = torch.Generator().manual_seed(seed)
    per_row = torch.randint(0, max_active + 1, (n_rows,), generator=g)
    cols = torch.cat([torch.randperm(n_latents, generator=g)[:k] for k in per_row.tolist()])
    values = torch.randn(len(cols), generator=g)  # ≤ 0 entries are in the code but did not fire
    return SparseCode(values, cols, torch.arange(n_rows).repeat_interleave(per_row), n_rows)


def split_rows(code: SparseCode, size: int) -> list[SparseCode]:
    parts = []
    for lo in range(0, code.n_rows, size):
        part = (code.rows >= lo) & (code.rows < lo + size)
        n = min(size, code.n_rows - lo)
        parts.append(SparseCode(code.values[part], code.cols[part], code.rows[part] - lo, n))
    return parts


def assert_same_counts(stats: CoactivationStats, feature_counts, pair_index, pair_counts) -> None:
    assert (
        stats.feature_counts.dtype
        == stats.pair_index.dtype
        == stats.pair_counts.dtype
        == torch.int64
    )
    assert stats.feature_counts.equal(feature_counts)
    assert stats.pair_index.equal(pair_index)
    assert stats.pair_counts.equal(pair_counts)


@pytest.mark.parametrize(
    ("n_latents", "budget"),
    [
        (40, 1 << 24),
        (40, 5),
        (60_000, 1 << 24),
    ],  # plain; pairs built a few rows at a time; int64 keys
)
def test_counts_match_a_dense_reference(n_latents: int, budget: int) -> None:
    code = random_code(n_rows=300, n_latents=n_latents, max_active=12, seed=n_latents + budget)
    counter = CoactivationCounter(n_latents, n_shards=4)
    for part in split_rows(code, 37):  # many batches: runs are merged across batches and shards
        counter.add(part, budget=budget)
    stats = counter.stats()
    assert stats.n_tokens == 300
    assert_same_counts(stats, *dense_reference(code, n_latents))
    assert (stats.pair_index[0] < stats.pair_index[1]).all()


def test_checkpointed_counter_state_resumes_exactly() -> None:
    code = random_code(n_rows=200, n_latents=30, max_active=9, seed=7)
    parts = split_rows(code, 50)
    first = CoactivationCounter(30)
    for part in parts[:2]:
        first.add(part, n_uncounted=1)
    resumed = CoactivationCounter(30)
    resumed.load_state_dict(first.state_dict(), first.n_tokens)
    for part in parts[2:]:
        resumed.add(part, n_uncounted=1)
    stats = resumed.stats()
    assert stats.n_tokens == 200 - 4  # one uncounted (passthrough) row per batch
    assert_same_counts(stats, *dense_reference(code, 30))


def dense_miss_reference(
    code: SparseCode, missed: SparseCode, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(miss_counts [n], miss_index [2, Q], miss_pair_counts [Q]) from dense bool codes: Dᵀ·M."""
    on, miss = [(c.to_dense(n) > 0).long() for c in (code, missed)]  # [N, n] each
    co = on.T @ miss  # [n, n]: fired i, missed j
    i, j = co.nonzero(as_tuple=True)  # row-major: sorted by (i, j)
    return miss.sum(0), torch.stack([i, j]), co[i, j]


@pytest.mark.parametrize("budget", [1 << 24, 5])
def test_miss_counts_match_a_dense_reference(budget: int) -> None:
    n = 40
    code = random_code(n_rows=300, n_latents=n, max_active=10, seed=1)
    # overlaps with code: allowed here
    missed = random_code(n_rows=300, n_latents=n, max_active=6, seed=2)
    counter = CoactivationCounter(n, n_shards=4, residual=True)
    for part, miss_part in zip(split_rows(code, 37), split_rows(missed, 37), strict=True):
        counter.add(part, missed=miss_part, budget=budget)
    stats = counter.stats()
    assert_same_counts(stats, *dense_reference(code, n))  # the co-activation counts are unchanged
    miss_counts, miss_index, miss_pair_counts = dense_miss_reference(code, missed, n)
    assert stats.miss_counts.equal(miss_counts) and stats.miss_index.equal(miss_index)
    assert stats.miss_pair_counts.equal(miss_pair_counts)
    resumed = CoactivationCounter(n, residual=True)  # a checkpoint carries the miss counts
    resumed.load_state_dict(counter.state_dict(), counter.n_tokens)
    assert resumed.stats().miss_pair_counts.equal(miss_pair_counts)
    with pytest.raises(ValueError, match="missed code exactly when"):
        counter.add(code)
    with pytest.raises(ValueError, match="missed code exactly when"):
        CoactivationCounter(n).add(code, missed=missed)
    with pytest.raises(ValueError, match="residual setting differs"):
        CoactivationCounter(n).load_state_dict(counter.state_dict(), counter.n_tokens)


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
