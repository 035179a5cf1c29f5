"""Label-free parents (graphs.parents): each step against an eager reference, the pick's reason, the
whole recipe on the tiny model (outputs, resume, bad input), and graph training with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from graphs import parents as P
from graphs import token_means
from graphs.coactivation_scores import CoactivationStats
from graphs.train import train_graph
from sae.io import load_sae
from sae.sae import SAE, SAEConfig
from tests.graphs.conftest import SOURCE_HOOK, graph_train_config


def tiny_parents_config(tiny_graph, out: Path, **overrides) -> P.ParentsConfig:
    fields = dict(
        store=str(tiny_graph.store.directory),
        sae=str(tiny_graph.sae_dirs / SOURCE_HOOK),
        out=str(out),
        tokens=0,
        n_parents=3,
        latents=16,
        k=2,
        steps=60,
        batch_size=64,
        min_count=2,
        min_freq=0.0,
        max_freq=1.0,
        cut=0.1,
        min_pair_count=2,
    )
    fields.update(overrides)
    return P.ParentsConfig(**fields)


@pytest.fixture(scope="module")
def tiny_parents(tiny_graph, tmp_path_factory):
    cfg = tiny_parents_config(tiny_graph, tmp_path_factory.mktemp("parents") / "p")
    return cfg, P.build_parents(cfg)


def test_mean_jaccard_matches_a_pairwise_loop():
    g = torch.Generator().manual_seed(0)
    active = torch.rand(50, 7, generator=g) < 0.3
    active[:, 6] = False  # an empty column: Jaccard 0 with everything
    expected = []
    for i in range(7):
        values = []
        for j in range(7):
            if i != j:
                union = (active[:, i] | active[:, j]).sum()
                values.append(float((active[:, i] & active[:, j]).sum() / union) if union else 0.0)
        expected.append(sum(values) / 6)
    torch.testing.assert_close(P.mean_jaccard(active), torch.tensor(expected, dtype=torch.float64))


def test_the_cross_cutting_pick_finds_a_latent_independent_of_meaning():
    """Four semantic latents partition the words; a 'letter' latent fires on a random 40% of all of
    them; a narrow latent fires inside one meaning. Only the letter latent co-fires across
    meanings."""
    g = torch.Generator().manual_seed(1)
    meaning = torch.arange(400) % 4
    active = torch.zeros(400, 6, dtype=torch.bool)
    active[torch.arange(400), meaning] = True
    active[:, 4] = torch.rand(400, generator=g) < 0.4  # the letter
    active[:, 5] = (meaning == 0) & (torch.rand(400, generator=g) < 0.5)  # narrow, inside meaning 0
    assert int(torch.argmax(P.mean_jaccard(active))) == 4


def test_set_means_match_direct_means():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    type_of = torch.randint(0, 6, (30,), generator=g)
    sums = torch.zeros(6, 5, dtype=torch.float64).index_add_(0, type_of, x)
    counts = torch.bincount(type_of, minlength=6)
    inside = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 1], [0, 0], [1, 0]], dtype=torch.bool)
    mean_in, mean_out = P.set_means(sums, counts, inside)
    for p in range(2):
        member = inside[type_of, p]
        torch.testing.assert_close(mean_in[p], x[member].mean(0))
        torch.testing.assert_close(mean_out[p], x[~member].mean(0))
    with pytest.raises(ValueError, match="empty"):
        P.set_means(sums, counts, torch.zeros(6, 1, dtype=torch.bool))


def test_installed_parents_fire_on_their_set_mean_and_not_on_the_rest():
    sae = SAE(SAEConfig(d_in=8, n_latents=10, k=3))
    g = torch.Generator().manual_seed(3)
    mean_in, mean_out = (
        torch.randn(2, 8, generator=g, dtype=torch.float64),
        torch.randn(2, 8, generator=g, dtype=torch.float64),
    )
    before = sae.W_dec.detach().clone()
    P.install_parents(sae, torch.tensor([7, 2]), mean_in, mean_out, median_value=1.5)
    for p, slot in enumerate((7, 2)):
        u = (mean_in[p] - mean_out[p]).float()
        torch.testing.assert_close(sae.W_dec[slot].detach(), u / u.norm())
        # pre-activation in centred-input space
        w, b = (
            sae.W_enc[slot].detach(),
            float(sae.b_enc[slot].detach()),
        )
        assert float(w @ mean_in[p].float()) + b == pytest.approx(1.5, abs=1e-4)
        assert float(w @ mean_out[p].float()) + b == pytest.approx(-1.5, abs=1e-4)
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[[7, 2]] = False
    assert torch.equal(sae.W_dec.detach()[untouched], before[untouched])


def test_the_recipe_on_the_tiny_model(tiny_graph, tiny_parents):
    cfg, out = tiny_parents
    meta = json.loads((out / "parents.json").read_text())
    base, parents = load_sae(cfg.sae), load_sae(out / "sae" / SOURCE_HOOK)
    slots = torch.tensor(meta["slots"])
    assert len(slots) == len(meta["picked"]) == len(meta["top_tokens"]) == cfg.n_parents
    # only the least-used latents were replaced
    types = token_means.load_type_stats(out / "type_stats.safetensors")
    assert torch.equal(
        slots.sort().values, torch.argsort(types.fires, stable=True)[: cfg.n_parents].sort().values
    )
    changed = (parents.W_dec != base.W_dec).any(1).nonzero().squeeze(1)
    assert set(changed.tolist()) <= set(slots.tolist())
    # the picked latents are the candidates with the highest mean Jaccard
    assert meta["mean_jaccard"] == sorted(meta["mean_jaccard"], reverse=True)
    tokmean = load_file(out / "tokmean-sae.safetensors")
    assert tokmean["active"].shape == (int((types.counts >= cfg.min_count).sum()), cfg.latents)
    assert (tokmean["active"].sum(1) <= cfg.k).all()
    # it learned something (0.84 on the tiny model's 162 type means)
    assert meta["tokmean_fvu"] < 0.95
    # every edge: a non-parent into its most likely parent, above the cut, on a pair seen often
    # enough
    edges = load_file(out / "edges.safetensors")["edge_index"]
    assert edges.shape[1] == meta["n_edges"] > 0
    stats = CoactivationStats.load(out / "stats")
    src, dst, prob = stats.conditional()
    seen = stats.pair_counts.repeat(2)
    best = {}
    for s, d, p, c in zip(src.tolist(), dst.tolist(), prob.tolist(), seen.tolist(), strict=True):
        if (
            d in slots.tolist()
            and s not in slots.tolist()
            and p > cfg.cut
            and c >= cfg.min_pair_count
        ):
            if s not in best or p > best[s][1]:
                best[s] = (d, p)
    assert sorted(edges[0].tolist()) == sorted(best)
    for s, d in edges.T.tolist():
        assert best[s][1] == pytest.approx(float(prob[(src == s) & (dst == d)][0]))


def test_a_rerun_resumes_and_other_settings_are_refused(tiny_graph, tiny_parents, monkeypatch):
    cfg, out = tiny_parents
    before = (out / "edges.safetensors").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    monkeypatch.setattr(P, "type_statistics", fail)
    monkeypatch.setattr(P, "train_tokmean_sae", fail)
    P.build_parents(cfg)
    assert (out / "edges.safetensors").stat().st_mtime_ns == before
    # killed after the stats, before the edges were recorded: they are recounted, identically
    edges = load_file(out / "edges.safetensors")["edge_index"]
    meta = json.loads((out / "parents.json").read_text())
    (out / "parents.json").write_text(
        json.dumps({k: v for k, v in meta.items() if k not in ("n_edges", "parents_reached")})
    )
    P.build_parents(cfg)
    assert json.loads((out / "parents.json").read_text()) == meta
    assert torch.equal(load_file(out / "edges.safetensors")["edge_index"], edges)
    assert not list(out.glob(".*.tmp"))
    with pytest.raises(ValueError, match="other settings"):
        P.build_parents(tiny_parents_config(tiny_graph, out, n_parents=2))


def test_bad_input_is_refused_before_work(tiny_graph, tmp_path):
    with pytest.raises(ValueError, match="--n-parents"):
        P.build_parents(tiny_parents_config(tiny_graph, tmp_path / "a", n_parents=1000, latents=8))
    assert not (tmp_path / "a" / "type_stats.safetensors").exists()  # refused before the pass
    with pytest.raises(ValueError, match="--k"):
        P.build_parents(tiny_parents_config(tiny_graph, tmp_path / "b", k=20))
    with pytest.raises(ValueError, match="--min-freq"):
        P.build_parents(tiny_parents_config(tiny_graph, tmp_path / "c", min_freq=0.3, max_freq=0.2))


def test_too_few_candidates_names_the_fix(tiny_graph, tmp_path):
    with pytest.raises(ValueError, match="lower --n-parents or widen"):
        P.build_parents(
            tiny_parents_config(tiny_graph, tmp_path / "p", min_freq=0.5, max_freq=0.51)
        )


def test_graph_training_with_the_parents_holds_their_edges_open(tiny_graph, tiny_parents, tmp_path):
    cfg, out = tiny_parents
    edges = load_file(out / "edges.safetensors")["edge_index"]
    model = train_graph(
        graph_train_config(
            tiny_graph.store,
            out / "stats",
            tmp_path / "g",
            edges=str(out / "edges.safetensors"),
            **P.HELD_OPEN,
        )
    )
    open_edges, _ = model.active_edges()
    assert open_edges.shape[1] == edges.shape[1]
    control = train_graph(
        graph_train_config(
            tiny_graph.store,
            out / "stats",
            tmp_path / "c",
            edges=str(out / "edges.safetensors"),
            **P.GATES_SHUT,
        )
    )
    assert control.active_edges()[0].shape[1] == 0


def test_the_command_line_prints_the_training_commands(tiny_graph, tiny_parents, capsys):
    from graphs.__main__ import main

    cfg, out = tiny_parents
    args = ["parents", "--store", cfg.store, "--sae", cfg.sae, "--out", str(out)]
    args += [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(cfg).items()
        if k not in ("store", "sae", "out", "model", "device")
    ]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    printed = json.loads(stdout[stdout.index("{\n") :])  # after the stats' "already holds" line
    assert printed["n_edges"] == json.loads((out / "parents.json").read_text())["n_edges"]
    assert (
        "--init-log-alpha 6.0" in printed["train"]
        and "--init-log-alpha -20.0" in printed["control"]
    )
    assert (
        "--implied-only" in printed["train"]
        and f"--edges {out / 'edges.safetensors'}" in printed["train"]
    )
    assert (
        main(["parents", "--store", cfg.store, "--sae", cfg.sae, "--out", str(out), "--k", "99"])
        == 2
    )
