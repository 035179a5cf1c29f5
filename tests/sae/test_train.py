"""The SAE trainer end to end on the tiny store: every architecture, logs, refusals, exact resume
after kill -9, data parallelism, schedule-free averaging, dead-latent windows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import schedulefree
import torch
from safetensors.torch import load_file

from sae.checkpoint import read_checkpoint_meta
from sae.config import TrainConfig
from sae.init import init_hook_state
from sae.io import load_sae
from sae.store import ActivationStore
from sae.train import train
from tests.conftest import kill_9_after_checkpoint
from tests.sae.conftest import HOOK, metric_rows, train_config

REPO = Path(__file__).resolve().parents[2]


def _crash_after_checkpoint(cfg: TrainConfig, step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train cfg until the checkpoint of `step` is written, then crash (in-process kill)."""
    import sae.train as train_module

    save = train_module.save_checkpoint

    def save_then_stop(out, at, *args):
        save(out, at, *args)
        if at == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu", "matryoshka"])
def test_training_lowers_fvu_for_every_architecture(
    tiny_store: ActivationStore, tmp_path: Path, arch: str
) -> None:
    train(train_config(tiny_store, tmp_path, arch=arch))
    rows = metric_rows(tmp_path)
    assert rows[-1]["fvu"] < min(0.6, 0.8 * rows[0]["fvu"]), [r["fvu"] for r in rows]
    sae = load_sae(tmp_path / HOOK)
    assert sae.cfg.arch == arch and sae.cfg.input_scale > 0
    if arch != "relu":
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.n_latents))
    if arch in ("batchtopk", "matryoshka"):  # the calibrated θ keeps k per token at inference
        x = tiny_store.rows(torch.arange(2048), hooks=[HOOK])[HOOK]
        assert sae.encode(x[~sae.passthrough(x)]).l0() == pytest.approx(8, rel=0.15)


def test_one_pass_trains_one_sae_per_hook_and_logs_everything(
    tiny_store: ActivationStore, tmp_path: Path
) -> None:
    train(train_config(tiny_store, tmp_path, hooks="", wandb="offline"))
    for hook in tiny_store.hooks:
        assert (tmp_path / hook / "sae.safetensors").exists()
        assert (tmp_path / hook / "cfg.json").exists()
        row = metric_rows(tmp_path, hook)[-1]
        assert {"loss", "fvu", "l0", "dead_fraction", "dense_fraction", "lr", "tok_s"} <= set(row)
    assert (tmp_path / "plots" / "training.png").stat().st_size > 10_000
    assert any((tmp_path / "wandb").glob("offline-run-*"))
    assert read_checkpoint_meta(tmp_path)["step"] == 40


def test_refusals_happen_before_training(tiny_store: ActivationStore, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no blocks.7.hook_resid_post"):
        train(train_config(tiny_store, tmp_path, hooks="blocks.7.hook_resid_post"))
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(train_config(tiny_store, tmp_path, batch_size=len(tiny_store) + 1))
    train(train_config(tiny_store, tmp_path, tokens=512))
    with pytest.raises(ValueError, match="pass --resume"):
        train(train_config(tiny_store, tmp_path, tokens=512))
    with pytest.raises(ValueError, match="k: checkpoint 8, now 4"):
        train(train_config(tiny_store, tmp_path, tokens=512, k=4, resume=True))


def _cli(store: ActivationStore, out: Path, *extra: str) -> list[str]:
    flags = f"""--hooks {HOOK} --arch topk --k 8 --expansion 16 --tokens {512 * 150}
        --batch-size 512 --lr 0.003 --checkpoint-every 2 --wandb disabled --dead-tokens 4096"""
    command = [sys.executable, "-m", "sae", "train", "--store", str(store.directory)]
    return [*command, "--out", str(out), *flags.split(), *extra]


def test_kill_9_and_resume_ends_with_identical_weights(
    tiny_store: ActivationStore, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reference = subprocess.run(
        _cli(tiny_store, tmp_path / "ref"), env=env, capture_output=True, text=True
    )
    assert reference.returncode == 0, reference.stderr
    killed = tmp_path / "killed"
    stopped_at = kill_9_after_checkpoint(_cli(tiny_store, killed), killed, 10, env)
    assert stopped_at < 150 and not (killed / HOOK).exists()
    resumed = subprocess.run(
        _cli(tiny_store, killed, "--resume"), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    expected, got = (
        load_file(tmp_path / "ref" / HOOK / "sae.safetensors"),
        load_file(killed / HOOK / "sae.safetensors"),
    )
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    steps = [r["step"] for r in metric_rows(killed)]
    assert steps == sorted(set(steps)) and steps[-1] == 150  # each logged step once


# jumprelu with the target-L0 recipe: the controller reads the global L0, dense AuxK the global
# residual, and reopened thresholds the global batch's quantile (dead after 2 steps, so it happens).
# The runs stay within one epoch (11 batches of the 3000-token store): a reopened θ equals one
# token's pre-activation, so when that token came back in the next epoch it sat exactly at θ and
# 1 vs 2 ranks became a coin flip on rounding (seen at step 12, identically in float64).
JUMPRELU_DDP = """--arch jumprelu --target-l0 6 --threshold-lr-scale 10 --dense-aux --reopen-dead
    --dead-tokens 512 --sparsity-warmup-frac 0.3""".split()


@pytest.mark.parametrize(
    "arch_flags", [["--arch", "topk"], JUMPRELU_DDP], ids=["topk", "jumprelu-target-l0"]
)
def test_two_cpu_ranks_match_one_rank_with_the_same_global_batch(
    tiny_store: ActivationStore, tmp_path: Path, arch_flags: list[str]
) -> None:
    flags = [
        *["--store", str(tiny_store.directory), "--hooks", HOOK, *arch_flags],
        *f"--k 8 --expansion 4 --tokens {256 * 11} --batch-size 256 --lr 0.003".split(),
        *"--wandb disabled --log-every 1".split(),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    ddp = [*torchrun, "--master_port", "29517", str(REPO / "scripts" / "train_ddp.py")]
    two = subprocess.run(
        [*ddp, *flags, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True
    )
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run(
        [sys.executable, "-m", "sae", "train", *flags, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    a = load_file(tmp_path / "one" / HOOK / "sae.safetensors")
    b = load_file(tmp_path / "two" / HOOK / "sae.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    rows = metric_rows(tmp_path / "one")
    assert rows[-1]["fvu"] < rows[0]["fvu"]  # the compared runs really trained
    if "--reopen-dead" in arch_flags:  # the compared runs really reopened and controlled λ
        assert (
            any(r["dead_fraction"] > 0 for r in rows)
            and len({r["sparsity_coeff"] for r in rows}) > 3
        )


def test_massive_activations_are_skipped_in_training_and_evaluation(
    tiny_store: ActivationStore, tmp_path: Path
) -> None:
    from sae.evaluate import reconstruction_metrics

    train(train_config(tiny_store, tmp_path, tokens=256 * 4))
    sae = load_sae(tmp_path / HOOK)
    median = tiny_store.rows(torch.arange(len(tiny_store)), hooks=[HOOK])[HOOK].norm(dim=1).median()
    assert sae.cfg.max_input_norm == pytest.approx(10 * median.item(), rel=0.1)
    result = reconstruction_metrics(sae, tiny_store)
    assert result["passthrough_fraction"] == 0.0 and result["tokens"] == len(tiny_store)
    with torch.no_grad():
        sae.cfg.max_input_norm = float(median)  # now half the rows count as "massive"
    result = reconstruction_metrics(sae, tiny_store)
    assert 0.4 < result["passthrough_fraction"] < 0.6 and result["tokens"] < len(tiny_store)


def test_resume_with_a_target_l0_restores_lambda_and_ends_identical(
    tiny_store: ActivationStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = dict(arch="relu", tokens=256 * 20, target_l0=4, checkpoint_every=5, log_every=1)
    train(train_config(tiny_store, tmp_path / "ref", **flags))
    _crash_after_checkpoint(train_config(tiny_store, tmp_path / "cut", **flags), 10, monkeypatch)
    assert read_checkpoint_meta(tmp_path / "cut")["sae_configs"][HOOK]["sparsity_coeff"] > 0
    train(train_config(tiny_store, tmp_path / "cut", resume=True, **flags))
    expected, got = (
        load_file(tmp_path / "ref" / HOOK / "sae.safetensors"),
        load_file(tmp_path / "cut" / HOOK / "sae.safetensors"),
    )
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert (
        load_sae(tmp_path / "cut" / HOOK).cfg.sparsity_coeff
        == load_sae(tmp_path / "ref" / HOOK).cfg.sparsity_coeff
    )


def test_target_l0_is_refused_for_the_topk_family(
    tiny_store: ActivationStore, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="--target-l0 adapts the sparsity penalty"):
        train(train_config(tiny_store, tmp_path, arch="topk", target_l0=8))


def test_a_checkpoint_from_before_the_new_settings_resumes_unless_one_is_turned_on(
    tiny_store: ActivationStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint written before a setting existed records no value for it: it resumes as that
    setting's default (new settings keep the old behaviour there), and only a resume that turns one
    on is refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    # before the setting, every run was Adam
    flags = dict(tokens=256 * 20, checkpoint_every=5, optimizer="adam")
    train(train_config(tiny_store, tmp_path / "ref", **flags))
    _crash_after_checkpoint(train_config(tiny_store, tmp_path / "old", **flags), 10, monkeypatch)
    path = tmp_path / "old" / "checkpoint.safetensors"
    # strip the settings added after format_version 1 shipped
    with safe_open(path, framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        meta = json.loads(f.metadata()["greylens"])
    newer = (
        "target_l0",
        "l0_control_rate",
        "l0_control_gain",
        "dense_aux",
        "jumprelu_bandwidth",
        "reopen_dead",
        "threshold_lr_scale",
        "optimizer",
    )
    meta["config"] = {k: v for k, v in meta["config"].items() if k not in newer}
    del meta["optimizer_groups"]
    save_file(tensors, path, metadata={"greylens": json.dumps(meta)})

    with pytest.raises(ValueError, match="dense_aux: checkpoint False, now True"):
        train(train_config(tiny_store, tmp_path / "old", resume=True, dense_aux=True, **flags))
    auto = {**flags, "optimizer": "auto"}  # auto is schedule-free for topk
    with pytest.raises(ValueError, match="optimizer: checkpoint 'adam', now 'auto'"):
        train(train_config(tiny_store, tmp_path / "old", resume=True, **auto))
    train(train_config(tiny_store, tmp_path / "old", resume=True, **flags))
    expected, got = (
        load_file(tmp_path / "ref" / HOOK / "sae.safetensors"),
        load_file(tmp_path / "old" / HOOK / "sae.safetensors"),
    )
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_the_optimizer_is_schedule_free_for_topk_and_adam_with_decay_otherwise(
    tiny_store: ActivationStore, tmp_path: Path
) -> None:
    """How the config picks the optimizer and its LR: tests/sae/test_config.py."""
    assert isinstance(
        init_hook_state(train_config(tiny_store, tmp_path / "a"), tiny_store, HOOK).optimizer,
        schedulefree.AdamWScheduleFree,
    )
    adam = train_config(tiny_store, tmp_path / "b", optimizer="adam")
    assert isinstance(init_hook_state(adam, tiny_store, HOOK).optimizer, torch.optim.Adam)
    # the saved SAE is the averaged point (not the last iterate the checkpoint holds), renormalised
    train(train_config(tiny_store, tmp_path / "run", tokens=256 * 10, checkpoint_every=10))
    saved = load_sae(tmp_path / "run" / HOOK)
    last_iterate = {
        k.removeprefix(f"{HOOK}/sae."): v
        for k, v in load_file(tmp_path / "run" / "checkpoint.safetensors").items()
        if k.startswith(f"{HOOK}/sae.")
    }
    assert not torch.allclose(saved.W_enc, last_iterate["W_enc"])
    torch.testing.assert_close(saved.W_dec.norm(dim=1), torch.ones(saved.cfg.n_latents))


def test_the_default_dead_window_lets_auxk_act_in_short_runs(
    tiny_store: ActivationStore, tmp_path: Path
) -> None:
    """The window's rule itself: tests/sae/test_firing.py."""
    # window 2048 = 8 steps
    train(train_config(tiny_store, tmp_path, dead_tokens=0, expansion=16, log_every=1))
    assert any(r["aux_loss"] > 0 for r in metric_rows(tmp_path))


def test_bfloat16_compute_trains_and_float32_is_the_cpu_default(
    tiny_store: ActivationStore, tmp_path: Path
) -> None:
    """--dtype bfloat16 runs the forward's matmuls under autocast (weights stay fp32) and still
    learns; on CPU, auto means float32 and gives exactly the float32 run."""
    from sae.config import compute_dtype

    assert compute_dtype(train_config(tiny_store, tmp_path, device="cpu")) == torch.float32
    with pytest.raises(ValueError, match="unknown --dtype 'float16'"):
        train_config(tiny_store, tmp_path, dtype="float16")
    runs = {}
    for dtype in ("bfloat16", "float32", "auto"):
        out = tmp_path / dtype
        runs[dtype] = train(train_config(tiny_store, out, arch="batchtopk", dtype=dtype))[HOOK]
        rows = metric_rows(out)
        assert all(torch.isfinite(torch.tensor(r["fvu"])) for r in rows)
        assert rows[-1]["fvu"] < min(0.6, 0.8 * rows[0]["fvu"]), (dtype, [r["fvu"] for r in rows])
    assert runs["bfloat16"].W_enc.dtype == torch.float32
    for name, param in runs["auto"].state_dict().items():
        torch.testing.assert_close(param, runs["float32"].state_dict()[name], rtol=0, atol=0)
    assert not torch.equal(runs["bfloat16"].W_enc, runs["float32"].W_enc)  # bf16 did run
