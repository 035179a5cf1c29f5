"""The sparsity penalty of jumprelu/relu: the target-L0 controller, reopened thresholds, and the
recipe that holds JumpReLU's L0 (--threshold-lr-scale, --dense-aux, --reopen-dead) in training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sae.config import TrainConfig
from sae.init import init_hook_state
from sae.io import load_sae
from sae.sparsity import adapt_sparsity_coeff, reopen_thresholds
from sae.store import ActivationStore
from sae.train import train
from tests.sae.conftest import HOOK, metric_rows, train_config


def test_l0_controller_moves_lambda_towards_the_target_by_a_bounded_factor() -> None:
    cfg = TrainConfig(arch="jumprelu", target_l0=32, sparsity_coeff=1e-3, l0_control_rate=0.1)
    assert adapt_sparsity_coeff(cfg, 1e-3, 32.0) == pytest.approx(1e-3)
    # too dense: λ up; too sparse: λ down
    assert adapt_sparsity_coeff(cfg, 1e-3, 64.0) == pytest.approx(1e-3 * 2**0.1)
    assert adapt_sparsity_coeff(cfg, 1e-3, 16.0) == pytest.approx(1e-3 * 2**-0.1)
    # the error is clamped to ±1 in log
    assert adapt_sparsity_coeff(cfg, 1e-3, 1e6) == pytest.approx(1e-3 * math.e**0.1)
    assert adapt_sparsity_coeff(cfg, 1e-3, 0.0) == pytest.approx(1e-3 * math.e**-0.1)


# the flags --target-l0 asks jumprelu runs to add
JUMPRELU_RECIPE = dict(threshold_lr_scale=10.0, dense_aux=True, reopen_dead=True)


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
    train(train_config(tiny_store, tmp_path / "fixed", **flags))
    train(train_config(tiny_store, tmp_path / "target", target_l0=6, **recipe, **flags))
    fixed, target = metric_rows(tmp_path / "fixed"), metric_rows(tmp_path / "target")
    fixed_l0 = sum(r["l0"] for r in fixed[-20:]) / 20
    held_l0 = [r["l0"] for r in target[-20:]]
    assert abs(fixed_l0 - 6) > 1.5, fixed_l0  # the fixed λ misses the target: the test has teeth
    assert (
        sum(held_l0) / 20 == pytest.approx(6, rel=0.15) and max(abs(v - 6) for v in held_l0) < 1.5
    ), held_l0
    assert target[-1]["fvu"] < 0.8 * target[0]["fvu"]
    l0, never_fired = _never_fired(tmp_path / "target" / HOOK, tiny_store)
    assert l0 == pytest.approx(6, rel=0.15) and never_fired < 0.05, (l0, never_fired)
    # the saved λ_I has taken the last step's integral update (×(L0/6)^rate); that step used
    # λ_I·(L0/6)^1
    integral = load_sae(tmp_path / "target" / HOOK).cfg.sparsity_coeff
    rate = TrainConfig().l0_control_rate
    assert target[-1]["sparsity_coeff"] == pytest.approx(
        integral * (target[-1]["l0"] / 6) ** (1 - rate), rel=1e-6
    )


def test_jumprelu_without_the_recipe_collapses_and_leaves_dead_latents(
    tiny_store: ActivationStore, tmp_path: Path
) -> None:
    """The failure the recipe fixes, on the tiny model: L0 falls from k=8 to under 3 and stays
    there even when λ is driven to ~0, with a quarter of the latents never firing again."""
    train(
        train_config(
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
    rows = metric_rows(tmp_path)
    assert min(r["l0"] for r in rows[:15]) < 3 and sum(r["l0"] for r in rows[-20:]) / 20 < 4.5
    assert rows[-1]["sparsity_coeff"] < 1e-3 * 0.05  # the controller gave up all of λ, in vain
    assert _never_fired(tmp_path / HOOK, tiny_store)[1] > 0.2


def test_reopen_puts_dead_thresholds_at_the_k_over_n_quantile_and_leaves_live_ones(
    tiny_store: ActivationStore,
) -> None:
    cfg = train_config(tiny_store, Path("unused"), arch="jumprelu", k=8)
    sae = init_hook_state(cfg, tiny_store, HOOK).sae
    x = tiny_store.rows(torch.arange(1024), hooks=[HOOK])[HOOK]
    dead = torch.zeros(sae.cfg.n_latents, dtype=torch.bool)
    dead[::2] = True
    with torch.no_grad():
        sae.log_threshold[dead] += 3.0  # far above their pre-activations: silent
    before = sae.log_threshold.detach().clone()
    assert torch.bincount(sae.encode(x).cols, minlength=sae.cfg.n_latents)[dead].sum() == 0
    reopen_thresholds(sae, x, dead, 8)
    assert torch.equal(sae.log_threshold[~dead], before[~dead])
    # firing rates
    fires = torch.bincount(sae.encode(x).cols, minlength=sae.cfg.n_latents).double() / len(x)
    floor = before[~dead].exp().median() / 2
    at_quantile = dead & (sae.log_threshold.exp() > floor * (1 + 1e-6))  # the rest sit on the floor
    assert at_quantile.sum() > 0.8 * dead.sum()
    expected = torch.full_like(fires[at_quantile], 8 / sae.cfg.n_latents)
    torch.testing.assert_close(fires[at_quantile], expected, atol=1.5 / len(x), rtol=0)
    assert bool((fires[dead] <= 8 / sae.cfg.n_latents + 1.5 / len(x)).all())


def test_reopen_never_sets_a_threshold_below_half_the_live_median(
    tiny_store: ActivationStore,
) -> None:
    """A dead latent whose pre-activations are all negative must not get θ ≈ 0 (it would turn
    dense)."""

    sae = init_hook_state(
        train_config(tiny_store, Path("unused"), arch="jumprelu", k=8), tiny_store, HOOK
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
    train(train_config(tiny_store, tmp_path, arch="jumprelu", sparsity_coeff=0.01, dead_tokens=256))
    rows = metric_rows(tmp_path)  # 40 steps, λ warm-up over the first 4, logged every 5
    assert [r["sparsity_coeff"] for r in rows] == [0.01] * len(rows)
    assert all(r["aux_loss"] == 0 for r in rows) and max(r["dead_fraction"] for r in rows) > 0
    cfg = train_config(tiny_store, tmp_path / "x", arch="jumprelu")
    assert len(init_hook_state(cfg, tiny_store, HOOK).optimizer.param_groups) == 1
    scaled = init_hook_state(
        TrainConfig(**{**cfg.__dict__, "threshold_lr_scale": 10.0}), tiny_store, HOOK
    )
    assert [g["lr_scale"] for g in scaled.optimizer.param_groups] == [1.0, 10.0]
    assert scaled.optimizer.param_groups[1]["params"] == [scaled.sae.log_threshold]


def test_dense_aux_trains_dead_jumprelu_latents(
    tiny_store: ActivationStore, tmp_path: Path
) -> None:
    train(
        train_config(
            tiny_store, tmp_path, arch="jumprelu", dense_aux=True, dead_tokens=256, log_every=1
        )
    )
    assert any(r["aux_loss"] > 0 for r in metric_rows(tmp_path))
