"""`python -m graphs train --resume`, `graphs stats` and `graphs export` resume like a harvest: the
same command re-issued after a kill always works, also when the kill came before anything was
checkpointed (it then starts from scratch). Each through the CLI's main(argv) on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import graphs.coactivation as coactivation
import graphs.train as graph_train
from graphs.__main__ import main
from graphs.release import load_release
from sae.checkpoint import read_checkpoint_meta
from tests.graphs.conftest import SOURCE_HOOK, TinyGraph


class Killed(Exception):
    """Stands for a kill -9 in-process."""


def _assert_same_files(got: Path, expected: Path, names: tuple[str, ...]) -> None:
    for name in names:
        ours, theirs = load_file(got / name), load_file(expected / name)
        assert ours.keys() == theirs.keys(), name
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}:{key}"


def _train_argv(tiny_graph: TinyGraph, out: Path, *extra: str) -> list[str]:
    inputs = ["--store", str(tiny_graph.store.directory), "--stats", str(tiny_graph.stats)]
    flags = f"--m 8 --min-count 2 --tokens {256 * 8} --batch-size 256 --checkpoint-every 3"
    return ["train", *inputs, "--out", str(out), *flags.split(), "--wandb", "disabled", *extra]


def test_graph_train_resume_with_nothing_then_after_a_partial_run(
    tiny_graph: TinyGraph,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    graph_files = ("graph.safetensors", "sae.safetensors")
    assert main(_train_argv(tiny_graph, tmp_path / "ref")) == 0
    # (a) nothing to resume: starts from scratch, says so, ends like a run without --resume
    assert main(_train_argv(tiny_graph, tmp_path / "fresh", "--resume")) == 0
    assert "starting from scratch" in capsys.readouterr().err
    _assert_same_files(tmp_path / "fresh", tmp_path / "ref", graph_files)
    # (b) killed right after the checkpoint of step 6, then the same command with --resume
    save = graph_train.save_checkpoint

    def save_then_die(out, at, *args):
        save(out, at, *args)
        if at == 6:
            raise Killed

    monkeypatch.setattr(graph_train, "save_checkpoint", save_then_die)
    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        main(_train_argv(tiny_graph, killed))
    monkeypatch.undo()
    assert read_checkpoint_meta(killed)["step"] == 6 and not (killed / "graph.json").exists()
    assert main(_train_argv(tiny_graph, killed, "--resume")) == 0
    assert "starting from scratch" not in capsys.readouterr().err
    _assert_same_files(killed, tmp_path / "ref", graph_files)


def _stats_argv(tiny_graph: TinyGraph, out: Path) -> list[str]:
    sae = tiny_graph.sae_dirs / SOURCE_HOOK
    inputs = ["--store", str(tiny_graph.store.directory), "--sae", str(sae), "--out", str(out)]
    return ["stats", *inputs, "--batch-size", "256", "--m", "8", "--min-count", "2"]


def test_stats_re_run_after_a_kill_before_the_first_checkpoint_starts_from_scratch(
    tiny_graph: TinyGraph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encode, calls = coactivation._encode, []

    def encode_or_die(sae, x, miss_k=0):  # killed in its 2nd batch, before any checkpoint
        calls.append(len(x))
        if len(calls) == 2:
            raise Killed
        return encode(sae, x, miss_k)

    monkeypatch.setattr(coactivation, "_encode", encode_or_die)
    out = tmp_path / "stats"
    with pytest.raises(Killed):
        main(_stats_argv(tiny_graph, out))
    assert out.is_dir() and not (out / coactivation.CHECKPOINT).exists()
    assert main(_stats_argv(tiny_graph, out)) == 0  # the same command again
    n_batches = -(-len(tiny_graph.store) // 256)
    assert len(calls) == 2 + n_batches  # counted from the start, every batch once
    monkeypatch.undo()
    assert main(_stats_argv(tiny_graph, tmp_path / "ref")) == 0
    _assert_same_files(out, tmp_path / "ref", ("stats.safetensors", "candidates.safetensors"))


def _export_argv(tiny_graph: TinyGraph, out: Path) -> list[str]:
    inputs = {
        "sae": tiny_graph.sae_dirs / SOURCE_HOOK,
        "store": tiny_graph.store.directory,
        "out": out,
    }
    flags = [f"--{key}={value}" for key, value in inputs.items()]
    return ["export", *flags, "--batch-size", "256", "--ce-tokens", "0", "--prompts", "the king"]


def test_export_re_run_after_a_kill_at_its_start_starts_from_scratch(
    tiny_graph: TinyGraph, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(_export_argv(tiny_graph, tmp_path / "ref")) == 0
    # what a kill between creating OUT.partial and writing its first progress file leaves
    out = tmp_path / "killed"
    (tmp_path / "killed.partial" / "work").mkdir(parents=True)
    (tmp_path / "killed.partial" / ".progress.json.tmp").write_text('{"form')
    assert main(_export_argv(tiny_graph, out)) == 0
    assert "starting from scratch" in capsys.readouterr().err
    resumed, unbroken = load_release(out), load_release(tmp_path / "ref")
    for name in ("features", "examples", "edges"):
        assert resumed.data[name].to_list() == unbroken.data[name].to_list()
    # a staging folder holding real files is someone's work: still refused, nothing touched
    other = tmp_path / "other.partial"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(_export_argv(tiny_graph, tmp_path / "other")) == 2
    assert "holds no progress.json" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine"
