from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae.checkpoint import read_checkpoint_meta
from sae.io import load_sae
from sae.store import ActivationStore
from sae.train import TrainConfig, geometric_median, train
from tests.conftest import kill_9_after_checkpoint

REPO = Path(__file__).resolve().parents[2]
HOOK = "blocks.1.hook_resid_post"


def _config(store: ActivationStore, out: Path, **overrides) -> TrainConfig:
    fields = dict(store=str(store.directory), out=str(out), hooks=HOOK, arch="topk", k=8, expansion=4,
                  tokens=256 * 40, batch_size=256, lr=3e-3, log_every=5, wandb="disabled", dead_tokens=2048)  # fmt: skip
    fields.update(overrides)
    return TrainConfig(**fields)


def _rows(out: Path, hook: str = HOOK) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["hook"] == hook]


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu", "matryoshka"])
def test_training_lowers_fvu_for_every_architecture(tiny_store: ActivationStore, tmp_path: Path, arch: str) -> None:
    train(_config(tiny_store, tmp_path, arch=arch))
    rows = _rows(tmp_path)
    assert rows[-1]["fvu"] < min(0.6, 0.8 * rows[0]["fvu"]), [r["fvu"] for r in rows]
    sae = load_sae(tmp_path / HOOK)
    assert sae.cfg.arch == arch and sae.cfg.input_scale > 0
    if arch != "relu":
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.n_latents))
    if arch in ("batchtopk", "matryoshka"):  # the calibrated θ keeps k per token on average at inference
        x = tiny_store.rows(torch.arange(2048), hooks=[HOOK])[HOOK]
        assert sae.encode(x[~sae.passthrough(x)]).l0() == pytest.approx(8, rel=0.15)


def test_one_pass_trains_one_sae_per_hook_and_logs_everything(tiny_store: ActivationStore, tmp_path: Path) -> None:
    train(_config(tiny_store, tmp_path, hooks="", wandb="offline"))
    for hook in tiny_store.hooks:
        assert (tmp_path / hook / "sae.safetensors").exists() and (tmp_path / hook / "cfg.json").exists()
        row = _rows(tmp_path, hook)[-1]
        assert {"loss", "fvu", "l0", "dead_fraction", "dense_fraction", "lr", "tok_s"} <= set(row)
    assert (tmp_path / "plots" / "training.png").stat().st_size > 10_000
    assert any((tmp_path / "wandb").glob("offline-run-*"))
    assert read_checkpoint_meta(tmp_path)["step"] == 40


def test_geometric_median_minimises_the_sum_of_distances() -> None:
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 10.0]])
    median = geometric_median(points)
    cost = lambda y: (points - y).norm(dim=1).sum()  # noqa: E731
    for delta in ([1e-2, 0], [0, 1e-2], [-1e-2, 0], [0, -1e-2]):
        assert cost(median) <= cost(median + torch.tensor(delta))
    assert median.norm() < points.mean(0).norm()  # robust to the outlier, unlike the mean


def test_refusals_happen_before_training(tiny_store: ActivationStore, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no blocks.7.hook_resid_post"):
        train(_config(tiny_store, tmp_path, hooks="blocks.7.hook_resid_post"))
    with pytest.raises(FileNotFoundError, match="no checkpoint.safetensors"):
        train(_config(tiny_store, tmp_path, resume=True))
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(_config(tiny_store, tmp_path, batch_size=len(tiny_store) + 1))
    train(_config(tiny_store, tmp_path, tokens=512))
    with pytest.raises(ValueError, match="pass --resume"):
        train(_config(tiny_store, tmp_path, tokens=512))
    with pytest.raises(ValueError, match="k: checkpoint 8, now 4"):
        train(_config(tiny_store, tmp_path, tokens=512, k=4, resume=True))


def _cli(store: ActivationStore, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sae", "train", "--store", str(store.directory), "--out", str(out), "--hooks",
            HOOK, "--arch", "topk", "--k", "8", "--expansion", "16", "--tokens", str(512 * 150), "--batch-size",
            "512", "--lr", "0.003", "--checkpoint-every", "2", "--wandb", "disabled", "--dead-tokens", "4096",
            *extra]  # fmt: skip


def test_kill_9_and_resume_ends_with_identical_weights(tiny_store: ActivationStore, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reference = subprocess.run(_cli(tiny_store, tmp_path / "ref"), env=env, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    killed = tmp_path / "killed"
    stopped_at = kill_9_after_checkpoint(_cli(tiny_store, killed), killed, 10, env)
    assert stopped_at < 150 and not (killed / HOOK).exists()
    resumed = subprocess.run(_cli(tiny_store, killed, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    expected, got = load_file(tmp_path / "ref" / HOOK / "sae.safetensors"), load_file(killed / HOOK / "sae.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    steps = [r["step"] for r in _rows(killed)]
    assert steps == sorted(set(steps)) and steps[-1] == 150  # each logged step once


def test_two_cpu_ranks_match_one_rank_with_the_same_global_batch(tiny_store: ActivationStore, tmp_path: Path) -> None:
    flags = ["--store", str(tiny_store.directory), "--hooks", HOOK, "--arch", "topk", "--k", "8", "--expansion", "4",
             "--tokens", str(256 * 12), "--batch-size", "256", "--lr", "0.003", "--wandb", "disabled"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", str(REPO / "scripts" / "train_ddp.py"), *flags, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True)  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "sae", "train", *flags, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = load_file(tmp_path / "one" / HOOK / "sae.safetensors"), load_file(tmp_path / "two" / HOOK / "sae.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    rows = _rows(tmp_path / "one")
    assert rows[-1]["fvu"] < rows[0]["fvu"]  # the compared runs really trained


def test_massive_activations_are_skipped_in_training_and_evaluation(tiny_store: ActivationStore, tmp_path: Path) -> None:
    from sae.evaluate import reconstruction_metrics

    train(_config(tiny_store, tmp_path, tokens=256 * 4))
    sae = load_sae(tmp_path / HOOK)
    median = tiny_store.rows(torch.arange(len(tiny_store)), hooks=[HOOK])[HOOK].norm(dim=1).median()
    assert sae.cfg.max_input_norm == pytest.approx(10 * median.item(), rel=0.1)
    result = reconstruction_metrics(sae, tiny_store)
    assert result["passthrough_fraction"] == 0.0 and result["tokens"] == len(tiny_store)
    with torch.no_grad():
        sae.cfg.max_input_norm = float(median)  # now half the rows count as "massive"
    result = reconstruction_metrics(sae, tiny_store)
    assert 0.4 < result["passthrough_fraction"] < 0.6 and result["tokens"] < len(tiny_store)
