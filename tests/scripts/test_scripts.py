"""Smoke tests: every scripts/bench_*.py and scripts/*_quality.py runs end to end on the tiny
model at minimal sizes, so a script that rots (an API it calls changed, a flag broke) fails CI.

Each script runs in this process through runpy with its own command line (imports are paid once),
on artefacts built once per session: a tiny train/held-out store with two hooks, a TopK SAE at
each hook, co-activation stats and a graph autoencoder. The side-venv contenders (SAELens,
sparsify, vLLM) are left out: each costs a cold side-venv process of tens of seconds.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from graphs.coactivation import StatsConfig, coactivation_stats
from graphs.train import GraphTrainConfig, train_graph
from sae.harvest import HarvestConfig, harvest
from sae.train import TrainConfig, train

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
L1, L2 = "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"
SAE_SIZE = dict(k=4, expansion=2, batch_size=256, wandb="disabled", checkpoint_every=10**9)


@pytest.fixture(scope="session")
def made(tmp_path_factory) -> dict[str, str]:
    """Paths of the tiny artefacts every script reads."""
    root = tmp_path_factory.mktemp("smoke")
    stores = {}
    for split, tokens in (("train", 3000), ("heldout", 1500)):
        cfg = HarvestConfig(
            out=str(root / split),
            model="tiny",
            hooks=f"{L1},{L2}",
            tokens=tokens,
            split=split,
            context_size=64,
        )
        stores[split] = str(harvest(cfg).directory)
    for name, hook in (("topk", L1), ("target", L2)):
        out = root / name
        train(TrainConfig(store=stores["train"], out=str(out), hooks=hook, tokens=1024, **SAE_SIZE))
    topk = str(root / "topk" / L1)
    coactivation_stats(
        StatsConfig(store=stores["train"], sae=topk, out=str(root / "stats"), tokens=1024)
    )
    graph = GraphTrainConfig(
        store=stores["train"],
        stats=str(root / "stats"),
        out=str(root / "graph"),
        tokens=1024,
        batch_size=256,
        wandb="disabled",
    )
    train_graph(graph)
    return {
        "root": str(root),
        "train": stores["train"],
        "heldout": stores["heldout"],
        "topk": topk,
        "target": str(root / "target" / L2),
        "stats": str(root / "stats"),
        "graph": str(root / "graph"),
    }


def run_script(name: str, *argv: str, capsys=None) -> str:
    """Run scripts/<name> as __main__ with argv; returns what it printed on stdout."""
    saved = sys.argv
    sys.argv = [str(SCRIPTS / name), *argv]
    try:
        runpy.run_path(str(SCRIPTS / name), run_name="__main__")
    finally:
        sys.argv = saved
    return capsys.readouterr().out if capsys else ""


def last_json(out: str) -> dict:
    """The JSON document a bench script printed last (indented over several lines)."""
    return json.loads(out[out.rindex("\n{") + 1 :] if "\n{" in out else out)


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")


def test_bench_harvest(capsys) -> None:
    out = run_script(
        "bench_harvest.py",
        *("--model", "tiny", "--hook", L1, "--tokens", "512", "--context-size", "64"),
        *("--repeats", "1", "--no-saelens"),
        capsys=capsys,
    )
    result = last_json(out)
    assert result["harvest_tokens"] == result["tokens"] == 512  # whole batches of 8 x 64
    assert result["harvest_tok_s"] > 0 and result["full_forward_tok_s"] > 0


def test_bench_train(made, capsys) -> None:
    out = run_script(
        "bench_train.py",
        *("--store", made["train"], "--eval-store", made["heldout"], "--hook", L1),
        *("--tokens", "1024", "--batch", "256", "--k", "4", "--expansion", "2"),
        *("--eval-tokens", "512", "--only", "greylens"),
        capsys=capsys,
    )
    ours = last_json(out)["results"]["greylens"]
    assert ours["steady_steps"] == 2  # 4 steps: the first and the last are left out
    assert ours["setup_s"] > 0 and ours["tok_per_s"] > 0
    assert 0 < ours["eval_fvu"] < 2


def test_bench_graph(made, capsys) -> None:
    out = run_script(
        "bench_graph.py",
        *("--store", made["train"], "--stats", made["stats"]),
        *("--steps", "4", "--batch-size", "256", "--rounds", "1"),
        capsys=capsys,
    )
    result = last_json(out)
    assert result["ratio"] > 0 and result["dead_tokens"] == GraphTrainConfig.dead_tokens


def test_bench_probes(made, capsys) -> None:
    out = run_script(
        "bench_probes.py",
        *("--model", "tiny", "--hook", L1, "--sae", made["topk"]),
        *("--batch", "2", "--tokens", "16", "--decode-steps", "2", "--repeats", "1"),
        capsys=capsys,
    )
    result = last_json(out)
    assert result["prefill"]["probes_over_forward"] > 0


def test_bench_serve(capsys) -> None:
    out = run_script(
        "bench_serve.py",
        *("--model", "tiny", "--only", "poisson,hf,prefix,long,load"),
        *("--n", "3", "--rates", "8", "--hf-batch", "3", "--system-len", "32"),
        *("--prefix-requests", "2", "--long-requests", "2", "--long-out", "8"),
        *("--long-blocks", "16", "--load-requests", "12", "--load-blocks", "6"),
        capsys=capsys,
    )
    result = last_json(out)
    assert result["load"]["completed"] == 12 and result["load"]["lost"] == 0
    assert result["hf"]["ratio"] > 0


def test_sae_quality(made, tmp_path, capsys) -> None:
    doc = tmp_path / "sae_quality.md"
    argv = [
        *("--model", "tiny", "--hook", L1, "--store", made["train"]),
        *("--eval-store", made["heldout"], "--out", str(tmp_path / "q"), "--doc", str(doc)),
        *("--tokens", "1024", "--batch", "256", "--expansion", "2", "--k", "4"),
        *("--dead-tokens", "512", "--archs", "topk", "--ce-tokens", "256"),
    ]
    run_script("sae_quality.py", *argv, capsys=capsys)
    first = doc.read_text()
    assert "| topk | k=4 |" in first and "--tokens 1024" in first
    assert (tmp_path / "q" / "topk" / L1 / "sae.safetensors").exists()  # the stable link
    # a re-run with another doc path reuses the cache and quotes the command that made it
    run_script("sae_quality.py", *argv, "--doc", str(tmp_path / "again.md"))
    assert "--doc " + str(doc) in (tmp_path / "again.md").read_text()


def test_probe_quality(made, tmp_path, capsys) -> None:
    doc = tmp_path / "probes.md"
    run_script(
        "probe_quality.py",
        *("--model", "tiny", "--hook", L1, "--sae", made["topk"], "--stats", made["stats"]),
        *("--graph-sae", made["graph"], "--out", str(tmp_path / "p"), "--doc", str(doc)),
        *("--tasks", "source", "--max-tokens", "16"),
        capsys=capsys,
    )
    text = doc.read_text()
    assert "| source | dense logistic |" in text and "probe_quality.py" in text


def test_graph_quality(made, tmp_path, capsys) -> None:
    doc = tmp_path / "graphs.md"
    out = run_script(
        "graph_quality.py",
        *("--model", "tiny", "--store", made["train"], "--eval-store", made["heldout"]),
        *("--pair-store", made["train"], "--topk", made["topk"], "--base", made["topk"]),
        *("--target", made["target"], "--out", str(tmp_path / "g"), "--doc", str(doc)),
        *("--half-tokens", "512", "--batch", "256", "--ce-tokens", "256"),
        *("--letter-tokens", "1500", "--seeds", "1,2"),
        capsys=capsys,
    )
    assert "(m) Matryoshka BatchTopK" in out and "Produced by" in doc.read_text()
