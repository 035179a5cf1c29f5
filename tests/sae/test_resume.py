"""`python -m sae train --resume` resumes like a harvest: the same command re-issued after a kill
always works. With nothing to resume it starts from scratch; after a partial run it continues and
ends with the weights of an uninterrupted run. Each through the CLI's main(argv)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sae.train as train_module
from sae.__main__ import main
from sae.checkpoint import CHECKPOINT, read_checkpoint_meta
from sae.store import ActivationStore
from tests.sae.conftest import HOOK, metric_rows


class Killed(Exception):
    """Stands for a kill -9 in-process (raised from inside the training loop)."""


def _argv(store: ActivationStore, out: Path, *extra: str) -> list[str]:
    flags = f"""--hooks {HOOK} --arch topk --k 8 --expansion 4 --tokens {256 * 12}
        --batch-size 256 --lr 0.003 --checkpoint-every 4 --log-every 2 --wandb disabled
        --dead-tokens 2048"""
    return ["train", "--store", str(store.directory), "--out", str(out), *flags.split(), *extra]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / HOOK / "sae.safetensors")


def _assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def _kill_at_checkpoint(monkeypatch: pytest.MonkeyPatch, step: int, written: bool) -> None:
    """Make the next run die at the checkpoint of `step`: after writing it (written) or before."""
    save = train_module.save_checkpoint

    def save_or_die(out, at, *args):
        if at == step and not written:
            raise Killed
        save(out, at, *args)
        if at == step:
            raise Killed

    monkeypatch.setattr(train_module, "save_checkpoint", save_or_die)


@pytest.fixture(scope="module")
def uninterrupted(tiny_store: ActivationStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(_argv(tiny_store, out)) == 0
    return out


def test_resume_with_nothing_to_resume_starts_from_scratch(
    tiny_store: ActivationStore,
    uninterrupted: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    out = tmp_path / "fresh"
    assert main(_argv(tiny_store, out, "--resume")) == 0
    assert "no checkpoint.safetensors" in capsys.readouterr().err  # says it starts from scratch
    assert read_checkpoint_meta(out)["step"] == 12
    _assert_same_weights(_weights(out), _weights(uninterrupted))


def test_resume_after_a_kill_before_the_first_checkpoint_starts_from_scratch(
    tiny_store: ActivationStore,
    uninterrupted: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    out = tmp_path / "killed"
    _kill_at_checkpoint(monkeypatch, 4, written=False)
    with pytest.raises(Killed):
        main(_argv(tiny_store, out))
    monkeypatch.undo()
    # the kill left a run directory with logged rows but no checkpoint
    assert not (out / CHECKPOINT).exists() and metric_rows(out)
    assert main(_argv(tiny_store, out, "--resume")) == 0
    assert "starting from scratch" in capsys.readouterr().err
    _assert_same_weights(_weights(out), _weights(uninterrupted))
    steps = [row["step"] for row in metric_rows(out)]
    assert steps == [row["step"] for row in metric_rows(uninterrupted)]  # no row twice


def test_resume_after_a_partial_run_continues_to_the_uninterrupted_weights(
    tiny_store: ActivationStore,
    uninterrupted: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    out = tmp_path / "killed"
    _kill_at_checkpoint(monkeypatch, 8, written=True)
    with pytest.raises(Killed):
        main(_argv(tiny_store, out))
    monkeypatch.undo()
    assert read_checkpoint_meta(out)["step"] == 8 and not (out / HOOK).exists()
    partial = load_file(out / CHECKPOINT)[f"{HOOK}/sae.W_dec"]  # [n_latents, d_model]
    capsys.readouterr()
    assert main(_argv(tiny_store, out, "--resume")) == 0
    assert "starting from scratch" not in capsys.readouterr().err
    _assert_same_weights(_weights(out), _weights(uninterrupted))
    # the comparison above can fail: the partial run's weights are not the final ones
    assert not torch.equal(partial, _weights(out)["W_dec"])
    assert read_checkpoint_meta(out)["step"] == 12
