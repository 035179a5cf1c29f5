from __future__ import annotations

import json
import math
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
    fields = dict(
        store=str(store.directory),
        out=str(out),
        hooks=HOOK,
        arch="topk",
        k=8,
        expansion=4,
        tokens=256 * 40,
        batch_size=256,
        lr=3e-3,
        log_every=5,
        wandb="disabled",
        dead_tokens=2048,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


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


def _rows(out: Path, hook: str = HOOK) -> list[dict]:
    return [
        r
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if r["hook"] == hook
    ]


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu", "matryoshka"])
def test_training_lowers_fvu_for_every_architecture(
    tiny_store: ActivationStore, tmp_path: Path, arch: str
) -> None:
    train(_config(tiny_store, tmp_path, arch=arch))
    rows = _rows(tmp_path)
    assert rows[-1]["fvu"] < min(0.6, 0.8 * rows[0]["fvu"]), [r["fvu"] for r in rows]
    sae = load_sae(tmp_path / HOOK)
    assert sae.cfg.arch == arch and sae.cfg.input_scale > 0
    if arch != "relu":
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.n_latents))
    if arch in (
        "batchtopk",
        "matryoshka",
    ):  # the calibrated θ keeps k per token on average at inference
        x = tiny_store.rows(torch.arange(2048), hooks=[HOOK])[HOOK]
        assert sae.encode(x[~sae.passthrough(x)]).l0() == pytest.approx(8, rel=0.15)


def test_one_pass_trains_one_sae_per_hook_and_logs_everything(
    tiny_store: ActivationStore, tmp_path: Path
) -> None:
    train(_config(tiny_store, tmp_path, hooks="", wandb="offline"))
    for hook in tiny_store.hooks:
        assert (tmp_path / hook / "sae.safetensors").exists() and (
            tmp_path / hook / "cfg.json"
        ).exists()
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
    return [
        sys.executable,
        "-m",
        "sae",
        "train",
        "--store",
        str(store.directory),
        "--out",
        str(out),
        "--hooks",
        HOOK,
        "--arch",
        "topk",
        "--k",
        "8",
        "--expansion",
        "16",
        "--tokens",
        str(512 * 150),
        "--batch-size",
        "512",
        "--lr",
        "0.003",
        "--checkpoint-every",
        "2",
        "--wandb",
        "disabled",
        "--dead-tokens",
        "4096",
        *extra,
    ]


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
    steps = [r["step"] for r in _rows(killed)]
    assert steps == sorted(set(steps)) and steps[-1] == 150  # each logged step once


# jumprelu with the target-L0 recipe: the controller reads the global L0, dense AuxK the global
# residual, and reopened thresholds the global batch's quantile (dead after 2 steps, so it happens).
# The runs stay within one epoch (11 batches of the 3000-token store): a reopened θ equals one
# token's pre-activation, so when that token came back in the next epoch it sat exactly at θ and
# 1 vs 2 ranks became a coin flip on rounding (seen at step 12, identically in float64).
JUMPRELU_DDP = [
    "--arch",
    "jumprelu",
    "--target-l0",
    "6",
    "--threshold-lr-scale",
    "10",
    "--dense-aux",
    "--reopen-dead",
    "--dead-tokens",
    "512",
    "--sparsity-warmup-frac",
    "0.3",
]


@pytest.mark.parametrize(
    "arch_flags", [["--arch", "topk"], JUMPRELU_DDP], ids=["topk", "jumprelu-target-l0"]
)
def test_two_cpu_ranks_match_one_rank_with_the_same_global_batch(
    tiny_store: ActivationStore, tmp_path: Path, arch_flags: list[str]
) -> None:
    flags = [
        "--store",
        str(tiny_store.directory),
        "--hooks",
        HOOK,
        *arch_flags,
        "--k",
        "8",
        "--expansion",
        "4",
        "--tokens",
        str(256 * 11),
        "--batch-size",
        "256",
        "--lr",
        "0.003",
        "--wandb",
        "disabled",
        "--log-every",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            str(REPO / "scripts" / "train_ddp.py"),
            *flags,
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run(
        [sys.executable, "-m", "sae", "train", *flags, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = (
        load_file(tmp_path / "one" / HOOK / "sae.safetensors"),
        load_file(tmp_path / "two" / HOOK / "sae.safetensors"),
    )
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    rows = _rows(tmp_path / "one")
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


def test_l0_controller_moves_lambda_towards_the_target_by_a_bounded_factor() -> None:
    from sae.sparsity import adapt_sparsity_coeff

    cfg = TrainConfig(arch="jumprelu", target_l0=32, sparsity_coeff=1e-3, l0_control_rate=0.1)
    assert adapt_sparsity_coeff(cfg, 1e-3, 32.0) == pytest.approx(1e-3)
    assert adapt_sparsity_coeff(cfg, 1e-3, 64.0) == pytest.approx(1e-3 * 2**0.1)  # too dense: λ up
    assert adapt_sparsity_coeff(cfg, 1e-3, 16.0) == pytest.approx(
        1e-3 * 2**-0.1
    )  # too sparse: λ down
    assert adapt_sparsity_coeff(cfg, 1e-3, 1e6) == pytest.approx(
        1e-3 * math.e**0.1
    )  # error clamped
    assert adapt_sparsity_coeff(cfg, 1e-3, 0.0) == pytest.approx(1e-3 * math.e**-0.1)


JUMPRELU_RECIPE = dict(
    threshold_lr_scale=10.0, dense_aux=True, reopen_dead=True
)  # see docs/sae_quality.md


def _never_fired(sae_dir: Path, store: ActivationStore) -> tuple[float, float]:
    """(L0, fraction of latents that never fire) of a trained SAE over the whole store."""
    sae = load_sae(sae_dir)
    x = store.rows(torch.arange(len(store)), hooks=[HOOK])[HOOK]
    code = sae.encode(x[~sae.passthrough(x)])
    fired = torch.bincount(code.cols, minlength=sae.cfg.n_latents) > 0
    return float(code.l0()), 1 - float(fired.double().mean())


@pytest.mark.parametrize("arch", ["jumprelu", "relu"])
def test_target_l0_is_reached_and_held_where_a_fixed_lambda_misses_it(
    tiny_store: ActivationStore, tmp_path: Path, arch: str
) -> None:
    flags = dict(arch=arch, k=8, tokens=256 * 120, lr=1e-2, log_every=1, sparsity_coeff=0.05)
    recipe = JUMPRELU_RECIPE if arch == "jumprelu" else {}
    train(_config(tiny_store, tmp_path / "fixed", **flags))
    train(_config(tiny_store, tmp_path / "target", target_l0=6, **recipe, **flags))
    fixed, target = _rows(tmp_path / "fixed"), _rows(tmp_path / "target")
    fixed_l0 = sum(r["l0"] for r in fixed[-20:]) / 20
    held_l0 = [r["l0"] for r in target[-20:]]
    assert abs(fixed_l0 - 6) > 1.5, fixed_l0  # the fixed λ misses the target: the test has teeth
    assert (
        sum(held_l0) / 20 == pytest.approx(6, rel=0.15) and max(abs(v - 6) for v in held_l0) < 1.5
    ), held_l0
    assert target[-1]["fvu"] < 0.8 * target[0]["fvu"]
    l0, never_fired = _never_fired(tmp_path / "target" / HOOK, tiny_store)
    assert l0 == pytest.approx(6, rel=0.15) and never_fired < 0.05, (l0, never_fired)
    # the saved λ_I has taken the last step's integral update (×(L0/6)^rate); that step used λ_I·(L0/6)^1
    integral, rate = (
        load_sae(tmp_path / "target" / HOOK).cfg.sparsity_coeff,
        TrainConfig().l0_control_rate,
    )
    assert target[-1]["sparsity_coeff"] == pytest.approx(
        integral * (target[-1]["l0"] / 6) ** (1 - rate), rel=1e-6
    )


def test_jumprelu_without_the_recipe_collapses_and_leaves_dead_latents(
    tiny_store: ActivationStore, tmp_path: Path
) -> None:
    """The failure the recipe fixes, on the tiny model: L0 falls from k=8 to under 3 and stays
    there even when λ is driven to ~0, with a quarter of the latents never firing again."""
    train(
        _config(
            tiny_store,
            tmp_path,
            arch="jumprelu",
            tokens=256 * 120,
            lr=1e-2,
            log_every=1,
            target_l0=6,
            sparsity_coeff=0.05,
        )
    )
    rows = _rows(tmp_path)
    assert min(r["l0"] for r in rows[:15]) < 3 and sum(r["l0"] for r in rows[-20:]) / 20 < 4.5
    assert rows[-1]["sparsity_coeff"] < 1e-3 * 0.05  # the controller gave up all of λ, in vain
    assert _never_fired(tmp_path / HOOK, tiny_store)[1] > 0.2


def test_reopen_puts_dead_thresholds_at_the_k_over_n_quantile_and_leaves_live_ones(
    tiny_store: ActivationStore,
) -> None:
    from sae.sparsity import reopen_thresholds
    from sae.train import _init_hook

    cfg = _config(tiny_store, Path("unused"), arch="jumprelu", k=8)
    sae = _init_hook(cfg, tiny_store, HOOK).sae
    x = tiny_store.rows(torch.arange(1024), hooks=[HOOK])[HOOK]
    dead = torch.zeros(sae.cfg.n_latents, dtype=torch.bool)
    dead[::2] = True
    with torch.no_grad():
        sae.log_threshold[dead] += 3.0  # far above their pre-activations: silent
    before = sae.log_threshold.detach().clone()
    assert torch.bincount(sae.encode(x).cols, minlength=sae.cfg.n_latents)[dead].sum() == 0
    reopen_thresholds(sae, x, dead, 8)
    assert torch.equal(sae.log_threshold[~dead], before[~dead])
    fires = torch.bincount(sae.encode(x).cols, minlength=sae.cfg.n_latents).double() / len(
        x
    )  # firing rates
    floor = before[~dead].exp().median() / 2
    at_quantile = dead & (sae.log_threshold.exp() > floor * (1 + 1e-6))  # the rest sit on the floor
    assert at_quantile.sum() > 0.8 * dead.sum()
    expected = torch.full_like(fires[at_quantile], 8 / sae.cfg.n_latents)
    torch.testing.assert_close(fires[at_quantile], expected, atol=1.5 / len(x), rtol=0)
    assert bool((fires[dead] <= 8 / sae.cfg.n_latents + 1.5 / len(x)).all())


def test_reopen_never_sets_a_threshold_below_half_the_live_median(
    tiny_store: ActivationStore,
) -> None:
    """A dead latent whose pre-activations are all negative must not get θ ≈ 0 (it would turn dense)."""
    from sae.sparsity import reopen_thresholds
    from sae.train import _init_hook

    sae = _init_hook(
        _config(tiny_store, Path("unused"), arch="jumprelu", k=8), tiny_store, HOOK
    ).sae
    x = tiny_store.rows(torch.arange(1024), hooks=[HOOK])[HOOK]
    dead = torch.zeros(sae.cfg.n_latents, dtype=torch.bool)
    dead[:4] = True
    with torch.no_grad():
        sae.b_enc[:4] = -1e3  # every pre-activation of these four is very negative
    live_median = sae.log_threshold[~dead].exp().median()
    reopen_thresholds(sae, x, dead, 8)
    torch.testing.assert_close(sae.log_threshold[:4].exp(), live_median.expand(4) / 2)


def test_defaults_keep_the_fixed_lambda_schedule_one_adam_group_and_no_dense_auxk(
    tiny_store: ActivationStore, tmp_path: Path
) -> None:
    from sae.train import _init_hook

    train(_config(tiny_store, tmp_path, arch="jumprelu", sparsity_coeff=0.01, dead_tokens=256))
    rows = _rows(tmp_path)  # 40 steps, λ warm-up over the first 4, logged every 5
    assert [r["sparsity_coeff"] for r in rows] == [0.01] * len(rows)
    assert all(r["aux_loss"] == 0 for r in rows) and max(r["dead_fraction"] for r in rows) > 0
    cfg = _config(tiny_store, tmp_path / "x", arch="jumprelu")
    assert len(_init_hook(cfg, tiny_store, HOOK).optimizer.param_groups) == 1
    scaled = _init_hook(
        TrainConfig(**{**cfg.__dict__, "threshold_lr_scale": 10.0}), tiny_store, HOOK
    )
    assert [g["lr_scale"] for g in scaled.optimizer.param_groups] == [1.0, 10.0]
    assert scaled.optimizer.param_groups[1]["params"] == [scaled.sae.log_threshold]


def test_dense_aux_trains_dead_jumprelu_latents(
    tiny_store: ActivationStore, tmp_path: Path
) -> None:
    train(
        _config(tiny_store, tmp_path, arch="jumprelu", dense_aux=True, dead_tokens=256, log_every=1)
    )
    assert any(r["aux_loss"] > 0 for r in _rows(tmp_path))


def test_resume_with_a_target_l0_restores_lambda_and_ends_identical(
    tiny_store: ActivationStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = dict(arch="relu", tokens=256 * 20, target_l0=4, checkpoint_every=5, log_every=1)
    train(_config(tiny_store, tmp_path / "ref", **flags))
    _crash_after_checkpoint(_config(tiny_store, tmp_path / "cut", **flags), 10, monkeypatch)
    assert read_checkpoint_meta(tmp_path / "cut")["sae_configs"][HOOK]["sparsity_coeff"] > 0
    train(_config(tiny_store, tmp_path / "cut", resume=True, **flags))
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
        train(_config(tiny_store, tmp_path, arch="topk", target_l0=8))


def test_a_checkpoint_from_before_the_new_settings_resumes_unless_one_is_turned_on(
    tiny_store: ActivationStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint written before a setting existed records no value for it: it resumes as that
    setting's default (new settings keep the old behaviour there), and only a resume that turns one
    on is refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    flags = dict(
        tokens=256 * 20, checkpoint_every=5, optimizer="adam"
    )  # before the setting, every run was Adam
    train(_config(tiny_store, tmp_path / "ref", **flags))
    _crash_after_checkpoint(_config(tiny_store, tmp_path / "old", **flags), 10, monkeypatch)
    path = tmp_path / "old" / "checkpoint.safetensors"
    with safe_open(
        path, framework="pt"
    ) as f:  # strip the settings added after format_version 1 shipped
        tensors, meta = (
            {key: f.get_tensor(key) for key in f.keys()},
            json.loads(f.metadata()["greylens"]),
        )
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
        train(_config(tiny_store, tmp_path / "old", resume=True, dense_aux=True, **flags))
    with pytest.raises(
        ValueError, match="optimizer: checkpoint 'adam', now 'auto'"
    ):  # auto is schedule-free for topk
        train(_config(tiny_store, tmp_path / "old", resume=True, **{**flags, "optimizer": "auto"}))
    train(_config(tiny_store, tmp_path / "old", resume=True, **flags))
    expected, got = (
        load_file(tmp_path / "ref" / HOOK / "sae.safetensors"),
        load_file(tmp_path / "old" / HOOK / "sae.safetensors"),
    )
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_the_optimizer_is_schedule_free_for_topk_and_adam_with_decay_otherwise(
    tiny_store: ActivationStore, tmp_path: Path
) -> None:
    import schedulefree

    from sae.train import _init_hook, base_lr, lr_at, optimizer_name

    for arch in ("topk", "batchtopk", "matryoshka", "jumprelu", "relu"):
        assert optimizer_name(TrainConfig(arch=arch)) == (
            "schedulefree" if arch == "topk" else "adam"
        )
        assert optimizer_name(TrainConfig(arch=arch, optimizer="schedulefree")) == "schedulefree"
    sf, adam = TrainConfig(arch="topk"), TrainConfig(arch="topk", optimizer="adam")
    assert (
        base_lr(sf, 16384) == 5e-3
        and base_lr(adam, 16384) == 2e-3
        and base_lr(TrainConfig(lr=1e-3), 16384) == 1e-3
    )
    assert lr_at(sf, 99, 100, 16384) == 5e-3 and lr_at(adam, 99, 100, 16384) == pytest.approx(
        2e-3 / 20
    )  # no decay
    assert lr_at(sf, 0, 100, 16384) == lr_at(adam, 0, 100, 16384) / 2e-3 * 5e-3  # both warm up
    assert isinstance(
        _init_hook(_config(tiny_store, tmp_path / "a"), tiny_store, HOOK).optimizer,
        schedulefree.AdamWScheduleFree,
    )
    assert isinstance(
        _init_hook(
            _config(tiny_store, tmp_path / "b", optimizer="adam"), tiny_store, HOOK
        ).optimizer,
        torch.optim.Adam,
    )
    # the saved SAE is the averaged point (not the last iterate the checkpoint holds), renormalised
    train(_config(tiny_store, tmp_path / "run", tokens=256 * 10, checkpoint_every=10))
    saved = load_sae(tmp_path / "run" / HOOK)
    last_iterate = {
        k.removeprefix(f"{HOOK}/sae."): v
        for k, v in load_file(tmp_path / "run" / "checkpoint.safetensors").items()
        if k.startswith(f"{HOOK}/sae.")
    }
    assert not torch.allclose(saved.W_enc, last_iterate["W_enc"])
    torch.testing.assert_close(saved.W_dec.norm(dim=1), torch.ones(saved.cfg.n_latents))


def test_the_default_dead_window_is_a_fifth_of_the_run_so_auxk_acts_in_short_runs(
    tiny_store: ActivationStore, tmp_path: Path
) -> None:
    from sae.train import dead_window

    assert (
        dead_window(TrainConfig(tokens=1_000_000)) == 200_000
    )  # a fixed 1M would never trigger here
    assert dead_window(TrainConfig(tokens=100_000_000)) == 1_000_000
    assert dead_window(TrainConfig(tokens=1000, batch_size=4096)) == 4096
    assert dead_window(TrainConfig(tokens=1_000_000, dead_tokens=5000)) == 5000
    train(
        _config(tiny_store, tmp_path, dead_tokens=0, expansion=16, log_every=1)
    )  # window 2048 = 8 steps
    assert any(r["aux_loss"] > 0 for r in _rows(tmp_path))
