"""Released feature datasets: streamed statistics against a dense reference, the round trip through
load_release, every side file, and an export killed mid-way then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from graphs.io import load_graph
from graphs.release import ExportConfig, export_release, load_release
from graphs.release_scan import KeepBest
from sae.io import load_sae
from sae.models import LoadedModel
from tests.graphs.conftest import SOURCE_HOOK, TARGET_HOOK, TinyGraph, release_config

CARD_FIELDS = (
    "model",
    "weights_sha256",
    "hook",
    "width",
    "architecture",
    "tokens",
    "fvu",
    "l0",
    "ce_loss_recovered",
    "dead_fraction",
    "corpus",
    "license",
)


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
    assert [
        sum(h) for h in features["hist_counts"]
    ] == fired.tolist()  # every activation lands in a bin
    assert features["dead"] == (fired == 0).tolist()


def test_contexts_hold_token_level_activations(tiny_release: Path, dense: torch.Tensor) -> None:
    release = load_release(tiny_release)
    for f in (0, 17, 101):
        rows = release.examples_of(f).to_list()
        top = [r for r in rows if r["kind"] == "top"]
        expected = dense[:, f].sort(descending=True).values[: len(top)]
        assert torch.allclose(
            torch.tensor([r["activation"] for r in top]), expected, atol=1e-5
        )  # the true top-k
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


def test_logits_labels_and_edges(
    tiny_release: Path, tiny: LoadedModel, tiny_graph: TinyGraph
) -> None:
    release = load_release(tiny_release)
    features = release.data["features"]
    sae = load_sae(tiny_graph.sae_dirs / SOURCE_HOOK)
    effects = (
        sae.W_dec.detach() * tiny.fast.model.norm.weight
    ) @ tiny.fast.lm_head.weight.T  # [n, vocab]
    assert features["top_logit_ids"][3] == effects[3].topk(10).indices.tolist()
    assert features["bottom_logit_ids"][3] == (-effects[3]).topk(10).indices.tolist()
    assert all(features["label_is_heuristic"]) and features["label"][0]
    edges = release.data["edges"].to_pandas()
    graph = load_graph(tiny_graph.graph)
    ours = edges[edges.kind == "graph"]
    assert sorted(zip(ours.src, ours.dst, strict=True)) == sorted(
        map(tuple, graph.edge_index.T.tolist())
    )
    assert set(edges[edges.kind == "crosslayer"].dst_hook) == {TARGET_HOOK}
    assert (edges.kind == "coactivation").any()
    some = int(ours.src.iloc[0])
    assert set(features["graph_out"][some]) <= set(ours[ours.src == some].dst)


def test_round_trip_card_and_side_files(tiny_release: Path, tiny_graph: TinyGraph) -> None:
    release = load_release(tiny_release)
    assert set(release.data) == {"features", "examples", "edges"}
    assert {k: len(v) for k, v in release.data.items()} == release.meta["counts"]
    assert all(release.card[k] is not None for k in CARD_FIELDS)
    assert release.card["width"] == 256 and release.card["hook"] == SOURCE_HOOK
    assert (
        "config_name: features" in release.readme
        and "| fvu |" in release.readme
        and "heuristic" in release.readme
    )
    original, exported = (
        load_sae(tiny_graph.sae_dirs / SOURCE_HOOK),
        release.sae(),
    )  # SAELens layout round trip
    x = tiny_graph.store.rows(torch.arange(64), hooks=[SOURCE_HOOK])[SOURCE_HOOK]
    assert torch.allclose(original(x), exported(x), atol=1e-4)
    row = release.data["features"][5]
    neuronpedia = release.neuronpedia(5)
    assert neuronpedia["index"] == "5" and neuronpedia["maxActApprox"] == pytest.approx(
        row["max_activation"]
    )
    assert neuronpedia["pos_str"] == row["top_logit_tokens"] and len(
        neuronpedia["activations"]
    ) == len(release.examples_of(5))
    circuits = release.circuits()
    assert len(circuits) == 2
    for graph in circuits.values():
        ids = {n["node_id"] for n in graph["nodes"]}
        assert graph["links"] and all(
            link["source"] in ids and link["target"] in ids for link in graph["links"]
        )
        assert {n["feature_type"] for n in graph["nodes"]} >= {"embedding", "sae feature", "logit"}
    assert release.dashboard.exists()


def test_unfinished_and_mismatched_exports_are_refused(
    tiny_graph: TinyGraph, tiny_release: Path, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError, match="not a finished greylens release"):
        load_release(tmp_path)
    assert (
        export_release(release_config(tiny_graph, tiny_release)) == tiny_release
    )  # finished: nothing to do
    with pytest.raises(ValueError, match="top_k"):
        export_release(release_config(tiny_graph, tiny_release, top_k=3))
    wrong = release_config(
        tiny_graph, tmp_path / "wrong", sae=str(tiny_graph.sae_dirs / TARGET_HOOK)
    )
    with pytest.raises(ValueError, match="pass the graph trained from this SAE"):
        export_release(wrong)
    assert not (tmp_path / "wrong.partial").exists()  # refused before anything was written


# The export CLI with each scan batch slowed by 0.25 s, so that the kill below lands mid-scan however
# slowly this process polls on a loaded machine (at full speed the tiny export can finish first).
_SLOW_EXPORT = (
    "import sys, time, graphs.release_scan as scan; batch = scan.scan_batch; "
    "scan.scan_batch = lambda *a, **k: (time.sleep(0.25), batch(*a, **k))[1]; "
    "from graphs.__main__ import main; main(sys.argv[1:])"
)


def _scanned_batches(log: Path) -> int:
    """Batches the scan has checkpointed so far (a line still being written is skipped)."""
    text = log.read_text() if log.exists() else ""
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    return max((json.loads(line).get("batches", [0, 0])[1] for line in lines), default=0)


def _kill_mid_scan(cfg: ExportConfig) -> None:
    """Run the export CLI and SIGKILL it once the scan has checkpointed two batches."""
    args = [sys.executable, "-c", _SLOW_EXPORT, "export"]
    for key, value in vars(cfg).items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = Path(cfg.out + ".partial") / "export_log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and _scanned_batches(log) < 2:
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the export finished before it could be killed"
    assert _scanned_batches(log) >= 2, "the export was killed before the scan checkpointed twice"


def test_killed_export_resumes_without_losing_or_repeating_work(
    tiny_graph: TinyGraph, tmp_path: Path
) -> None:
    settings = dict(batch_size=64, checkpoint_every=1, ce_tokens=0, prompts="the king said")
    cfg = release_config(tiny_graph, tmp_path / "killed", **settings)
    _kill_mid_scan(cfg)
    assert (
        not Path(cfg.out).exists() and Path(cfg.out + ".partial").exists()
    )  # atomic: no half release at OUT
    with pytest.raises(FileNotFoundError, match="re-run it with the same arguments"):
        load_release(cfg.out + ".partial")
    log = Path(cfg.out + ".partial") / "export_log.jsonl"
    done_before = [json.loads(line) for line in log.read_text().splitlines()]
    export_release(cfg)  # resume
    entries = [
        json.loads(line) for line in (Path(cfg.out) / "export_log.jsonl").read_text().splitlines()
    ]
    assert entries[: len(done_before)] == done_before  # nothing lost
    scans = [e["batches"] for e in entries if e.get("stage") == "scan" and "batches" in e]
    assert [a for a, _ in scans] == [0] + [
        b for _, b in scans[:-1]
    ]  # contiguous: no batch scanned twice
    assert scans[-1][1] == -(-len(tiny_graph.store) // 64)
    stages = [e["stage"] for e in entries if e.get("done")]
    assert len(stages) == len(set(stages)) == 9  # every stage ran exactly once
    reference = export_release(release_config(tiny_graph, tmp_path / "reference", **settings))
    resumed, unbroken = load_release(cfg.out), load_release(reference)
    for name in ("features", "examples", "edges"):
        assert resumed.data[name].to_list() == unbroken.data[name].to_list()
    assert resumed.card == unbroken.card and resumed.readme == unbroken.readme


def test_export_cli_help_lists_the_release_flags(capsys: pytest.CaptureFixture) -> None:
    from graphs.__main__ import main

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    usage = capsys.readouterr().out
    assert all(
        flag in usage for flag in ("--sae", "--graph", "--store", "--out", "--top-k", "--quantiles")
    )
