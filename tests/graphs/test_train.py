"""Graph autoencoder training: end to end on the tiny model, exact resume, planted-edge recovery."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from graphs.coactivation import CoactivationStats, StatsConfig, coactivation_stats
from graphs.coders import AsSAE
from graphs.eval import PlantedHierarchy, PlantedHierarchyConfig, edge_recovery, write_store
from graphs.eval.reconstruction import edge_jaccard, graph_metrics
from graphs.io import load_graph, load_graph_sae
from graphs.model import SparseGraphAutoencoder
from graphs.train import GraphTrainConfig, train_graph
from sae.io import load_sae
from sae.train import TrainConfig, train
from tests.conftest import kill_9_after_checkpoint
from tests.graphs.conftest import SOURCE_HOOK, TinyGraph, graph_train_config

REPO = Path(__file__).resolve().parents[2]


def test_trained_graph_files_metrics_and_budget(tiny_graph: TinyGraph) -> None:
    model = load_graph_sae(tiny_graph.graph)
    data = load_graph(tiny_graph.graph)
    assert data.num_nodes == model.n_latents
    assert data.edge_index.shape[1] == model.active_edges()[0].shape[1]
    assert model.sae.cfg.hook == SOURCE_HOOK and float(model.sae.threshold) > 0  # calibrated θ
    result = graph_metrics(model, tiny_graph.store)
    assert 0 < result["fvu"] < 1 and result["l0"] >= result["l0_evidence"] > 0
    assert result["l0"] == pytest.approx(result["l0_evidence"] + result["implied_per_token"])
    rows = [
        json.loads(line) for line in (tiny_graph.graph / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[-1]["evidence_k"] < 8  # the controller gave implied features part of the budget
    # post-propagation L0 tracks k = 8
    assert abs(rows[-1]["l0"] - 8) < abs(rows[0]["l0"] - 8) + 0.5
    x = tiny_graph.store.rows(torch.arange(64), hooks=[SOURCE_HOOK])[SOURCE_HOOK]
    spliced = AsSAE(model)(x)
    assert spliced.shape == (64, model.sae.cfg.d_in)


def _cli(tiny_graph: TinyGraph, out: Path, *extra: str) -> list[str]:
    inputs = ["--store", str(tiny_graph.store.directory), "--stats", str(tiny_graph.stats)]
    flags = f"--m 8 --min-count 2 --tokens {256 * 40} --batch-size 256 --checkpoint-every 1"
    command = [sys.executable, "-m", "graphs", "train", *inputs, "--out", str(out)]
    return [*command, *flags.split(), "--wandb", "disabled", *extra]


def test_kill_9_and_resume_ends_with_identical_graph(tiny_graph: TinyGraph, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    reference = subprocess.run(
        _cli(tiny_graph, tmp_path / "ref"), env=env, capture_output=True, text=True
    )
    assert reference.returncode == 0, reference.stderr[-2000:]
    killed = tmp_path / "killed"
    stopped_at = kill_9_after_checkpoint(_cli(tiny_graph, killed), killed, 5, env)
    assert stopped_at < 40 and not (killed / "graph.json").exists()
    resumed = subprocess.run(
        _cli(tiny_graph, killed, "--resume"), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("graph.safetensors", "sae.safetensors"):
        expected, got = load_file(tmp_path / "ref" / name), load_file(killed / name)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{name}:{key}"


def test_resume_with_other_settings_and_bad_inputs_are_refused(
    tiny_graph: TinyGraph, tmp_path: Path
) -> None:
    cfg = graph_train_config(
        tiny_graph.store, tiny_graph.stats, tmp_path / "g", min_count=2, tokens=512
    )
    train_graph(cfg)
    with pytest.raises(ValueError, match="already holds a training run"):
        train_graph(cfg)
    with pytest.raises(ValueError, match="edge_coeff"):
        train_graph(GraphTrainConfig(**{**cfg.__dict__, "resume": True, "edge_coeff": 1.0}))
    with pytest.raises(ValueError, match="no candidate edges"):
        train_graph(
            graph_train_config(tiny_graph.store, tiny_graph.stats, tmp_path / "h", min_count=10**9)
        )
    with pytest.raises(FileNotFoundError, match="co-activation stats"):
        train_graph(graph_train_config(tiny_graph.store, tmp_path, tmp_path / "i"))


def test_graph_command_line(tiny_graph: TinyGraph, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    explain_cli = [sys.executable, "-m", "graphs", "explain"]
    explain = subprocess.run(
        [
            *explain_cli,
            *["--graph", str(tiny_graph.graph), "--model", "tiny"],
            *["--transition", str(tiny_graph.transition), "--text", "the king said"],
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert explain.returncode == 0, explain.stderr[-2000:]
    out = json.loads(explain.stdout)
    assert out["source_hook"] == SOURCE_HOOK and len(out["positions"]) >= 3
    bad = subprocess.run(
        [*explain_cli, "--graph", str(tmp_path), "--model", "tiny", "--text", "x"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "python -m graphs train" in bad.stderr


def _planted_hierarchy_graph(
    tmp_path: Path,
) -> tuple[PlantedHierarchy, str, SparseGraphAutoencoder]:
    """A 4× TopK SAE (k = 6), its co-activation stats (with residual counts) and the graph
    autoencoder, 60k tokens each, on the planted hierarchy (unit-scale data)."""
    hierarchy = PlantedHierarchy.build(PlantedHierarchyConfig(parent_child_cos=0.0))
    store = write_store(hierarchy, tmp_path / "store", 60_000)
    hook = store.hooks[0]
    common = dict(store=str(store.directory), tokens=60_000, batch_size=1024, wandb="disabled")
    sae_dir = tmp_path / "sae"
    train(TrainConfig(**common, out=str(sae_dir), arch="topk", k=6, expansion=4, outlier_ratio=0))
    stats = tmp_path / "stats"
    coactivation_stats(
        StatsConfig(store=common["store"], sae=str(sae_dir / hook), out=str(stats), residual=True)
    )
    graph = GraphTrainConfig(
        **common,
        stats=str(stats),
        out=str(tmp_path / "g"),
        m=8,
        init_weight=0.5,
        init_log_alpha=-1.0,
        graph_lr=0.02,
        edge_coeff=0.05,
    )
    return hierarchy, hook, train_graph(graph)


def test_synthetic_hierarchy_planted_edges_are_recovered_far_above_the_null(tmp_path: Path) -> None:
    """Planted child ⇒ parent edges (32 parents × 3 children, 192 true features in 64 dims), a 4×
    TopK SAE (k = 6; ~4.2 features per token), then its co-activation stats and the graph
    autoencoder. Thresholds: recall ≥ 0.4 of the 96 planted edges, and precision and recall ≥ 10×
    the shuffled-target null (the null sits near 1/32: one parent in 32)."""
    hierarchy, hook, model = _planted_hierarchy_graph(tmp_path)
    edges, strengths = model.active_edges()
    got = edge_recovery(edges, strengths, model.sae.W_dec.detach(), hierarchy)
    assert got["recall"] >= 0.4, got
    assert got["recall"] >= 10 * got["null_recall"], got
    assert got["precision"] >= 10 * got["null_precision"], got
    # the post-hoc candidates of the same SAE, cut to the same number of edges: the (b) baseline
    stats = CoactivationStats.load(tmp_path / "stats")
    candidates, scores = stats.candidates(8)
    top = torch.argsort(scores, descending=True)[: edges.shape[1]]
    W_dec = load_sae(tmp_path / "sae" / hook).W_dec.detach()
    posthoc = edge_recovery(candidates[:, top], scores[top], W_dec, hierarchy)
    assert posthoc["recall"] > 10 * posthoc["null_recall"]
    # residual candidates (j missed when i fires) against co-activation ones, both cut to the 96
    # planted edges' count: residual ones are both more precise and recall more
    scored = {}
    for score, min_count in (("residual", 20), ("npmi", 5)):
        candidates, scores = stats.candidates(8, score, min_count)
        top = torch.argsort(scores, descending=True)[:96]
        scored[score] = edge_recovery(candidates[:, top], scores[top], W_dec, hierarchy)
    residual, npmi = scored["residual"], scored["npmi"]
    assert residual["precision"] >= 0.5, residual
    assert residual["precision"] >= 10 * residual["null_precision"], residual
    assert residual["precision"] > npmi["precision"] and residual["recall"] > npmi["recall"], scored


def test_edge_jaccard_by_hand() -> None:
    a = torch.tensor([[0, 1, 2], [1, 2, 0]])  # 0→1, 1→2, 2→0
    b = torch.tensor([[0, 2, 2, 0], [1, 0, 1, 1]])  # 0→1, 2→0, 2→1 (0→1 twice)
    assert edge_jaccard(a, b, 3) == pytest.approx(2 / 4)
    assert edge_jaccard(a, a.flip(0), 3) == 0.0  # direction matters


def test_geometry_candidates_and_implied_cost_options(
    tiny_graph: TinyGraph, tmp_path: Path
) -> None:
    """--geometry-m adds decoder-cosine candidates to the co-activation ones (a superset, saved
    with the model); --implied-cost 0 lets implied features ride free, so the controller keeps
    the evidence budget at k while post-propagation L0 ends above it."""
    from graphs.candidates import geometry_candidates

    plain = train_graph(
        graph_train_config(tiny_graph.store, tiny_graph.stats, tmp_path / "plain", min_count=2)
    )
    geo = train_graph(
        graph_train_config(
            tiny_graph.store,
            tiny_graph.stats,
            tmp_path / "geo",
            min_count=2,
            geometry_m=4,
            geometry_min_cos=0.0,
            implied_cost=0.0,
            init_log_alpha=3.0,
            init_weight=1.0,
        )
    )
    n = plain.n_latents
    keys = lambda e: set((e[0] * n + e[1]).tolist())  # noqa: E731
    sae = load_sae(tiny_graph.sae_dirs / SOURCE_HOOK)
    assert keys(plain.edge_index) < keys(geo.edge_index)
    assert keys(geometry_candidates(sae.W_dec, 4, 0.0)) <= keys(
        load_graph_sae(tmp_path / "geo").edge_index
    )
    rows = [
        json.loads(line) for line in (tmp_path / "geo" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[-1]["implied_per_token"] > 0.5 and rows[-1]["evidence_k"] == pytest.approx(
        8, abs=0.5
    )
    assert rows[-1]["l0"] > 8.3


def test_residual_candidates_train_and_need_residual_stats(
    tiny_graph: TinyGraph, tmp_path: Path
) -> None:
    """--score residual takes the (i active, j missed) candidates of stats counted with --residual,
    and refuses stats without them, naming the fix, before any training."""
    with pytest.raises(
        ValueError, match="recompute them with `python -m graphs stats ... --residual`"
    ):
        train_graph(
            graph_train_config(
                tiny_graph.store, tiny_graph.stats, tmp_path / "refused", score="residual"
            )
        )
    assert not (tmp_path / "refused").exists()
    stats_dir = tmp_path / "stats"
    stats = coactivation_stats(
        StatsConfig(
            store=str(tiny_graph.store.directory),
            out=str(stats_dir),
            residual=True,
            sae=str(tiny_graph.sae_dirs / SOURCE_HOOK),
            batch_size=512,
            m=8,
            min_count=2,
        )
    )
    graph = train_graph(
        graph_train_config(
            tiny_graph.store, stats_dir, tmp_path / "g", min_count=2, score="residual"
        )
    )
    expected, _ = stats.candidates(8, "residual", 2)
    n = graph.n_latents
    assert expected.shape[1] > 0
    assert sorted((expected[0] * n + expected[1]).tolist()) == sorted(
        (graph.edge_index[0] * n + graph.edge_index[1]).tolist()
    )


def test_candidate_edges_from_a_file(tiny_graph: TinyGraph, tmp_path: Path) -> None:
    """--edges replaces the stats' candidates by the file's edge_index; bad files are refused by
    name."""
    from safetensors.torch import save_file

    edges = torch.tensor([[0, 3, 5, 5], [1, 2, 0, 7]])
    save_file({"edge_index": edges}, tmp_path / "edges.safetensors")
    graph = train_graph(
        graph_train_config(
            tiny_graph.store,
            tiny_graph.stats,
            tmp_path / "g",
            edges=str(tmp_path / "edges.safetensors"),
        )
    )
    assert graph.edge_index.tolist() == edges.tolist()  # already sorted by (source, target)
    for name, tensors, message in [
        ("missing.safetensors", None, "is not a file"),
        ("wrong.safetensors", {"edges": edges}, "must hold an integer tensor edge_index"),
        (
            "float.safetensors",
            {"edge_index": edges.float()},
            "must hold an integer tensor edge_index",
        ),
        ("wide.safetensors", {"edge_index": edges * 100}, r"outside 0\.\.255"),
    ]:
        if tensors is not None:
            save_file(tensors, tmp_path / name)
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            train_graph(
                graph_train_config(
                    tiny_graph.store,
                    tiny_graph.stats,
                    tmp_path / name.split(".")[0],
                    edges=str(tmp_path / name),
                )
            )
        assert not (tmp_path / name.split(".")[0]).exists()


def test_matryoshka_base_starts_the_evidence_encoder_and_other_archs_are_refused(
    tiny_graph: TinyGraph, tmp_path: Path
) -> None:
    """A matryoshka SAE (BatchTopK with nested losses) can be the graph's base: the evidence encoder
    starts from its weights and θ, as a plain batchtopk SAE; a relu SAE is refused by name."""
    from graphs.train import _init_model

    store = str(tiny_graph.store.directory)
    for arch in ("matryoshka", "relu"):
        train(
            TrainConfig(
                store=store,
                out=str(tmp_path / arch),
                arch=arch,
                k=8,
                expansion=4,
                tokens=256 * 4,
                batch_size=256,
                wandb="disabled",
            )
        )
        coactivation_stats(
            StatsConfig(
                store=store,
                sae=str(tmp_path / arch / SOURCE_HOOK),
                out=str(tmp_path / f"stats-{arch}"),
                batch_size=512,
                m=8,
                min_count=2,
            )
        )
    with pytest.raises(ValueError, match="topk, batchtopk or matryoshka SAE, not 'relu'"):
        train_graph(
            graph_train_config(
                tiny_graph.store, tmp_path / "stats-relu", tmp_path / "refused", min_count=2
            )
        )
    assert not (tmp_path / "refused").exists()
    base = load_sae(tmp_path / "matryoshka" / SOURCE_HOOK)
    assert base.cfg.arch == "matryoshka" and float(base.threshold) > 0
    cfg = graph_train_config(
        tiny_graph.store, tmp_path / "stats-matryoshka", tmp_path / "g", min_count=2, tokens=512
    )
    start = _init_model(cfg, CoactivationStats.load(cfg.stats), base, None)
    assert start.sae.cfg.arch == "batchtopk" and start.sae.cfg.matryoshka_groups == []
    started = start.sae.state_dict()
    for name, tensor in base.state_dict().items():
        assert torch.equal(started[name], tensor), name
    graph = train_graph(cfg)
    assert graph.sae.cfg.arch == "batchtopk" and (tmp_path / "g" / "graph.json").exists()
    assert load_graph_sae(tmp_path / "g").sae.cfg.matryoshka_groups == []
