"""The training step issues no device→host sync: nothing that waits for the GPU (`.item()`,
`.tolist()`, `bool(t)`, data-dependent shapes) runs in a step that does not log or checkpoint.

Checked on CPU with a TorchDispatchMode that records the aten ops which would block the host on
CUDA, so no GPU is needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import sae.sae as sae_module
from sae.distributed import Distributed
from sae.init import init_hook_state
from sae.kernels import row_offsets
from sae.sae import SAE, SAEConfig
from sae.store import ActivationStore
from sae.train import _train_hook, device_rows
from tests.sae.conftest import HOOK, train_config

aten = torch.ops.aten
# ops whose result the host must wait for: a scalar read back, or an output shape set by the data
SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.bincount.default,  # CUDA's kernel reads the largest id back to size its output
}
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
# Tensor methods that read values back on the host; on CPU .tolist() dispatches no aten op at all
SYNC_METHODS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__}


class SyncRecorder(TorchDispatchMode):
    """Records the name of every op that forces a device→host sync or has a data-dependent shape
    (indexing, read or write, with a bool index hides a nonzero)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self._methods = _MethodRecorder(self.syncs)

    def __enter__(self) -> SyncRecorder:
        self._methods.__enter__()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._methods.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS or (func in INDEX_OPS and _has_bool_index(args)):
            self.syncs.append(str(func))
        return func(*args, **kwargs)


class _MethodRecorder(TorchFunctionMode):
    def __init__(self, syncs: list[str]) -> None:
        super().__init__()
        self.syncs = syncs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNC_METHODS:
            self.syncs.append(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


def _has_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(i is not None and i.dtype == torch.bool for i in indices)


def test_the_recorder_sees_each_kind_of_sync() -> None:
    """The recorder itself can fail: each listed form of sync is caught."""
    x = torch.randn(8)
    for sync in (
        lambda: x.sum().item(),
        lambda: x.tolist(),
        lambda: bool((x > 0).any()),
        lambda: x[x > 0],
        lambda: x.nonzero(),
        lambda: x.masked_select(x > 0),
        lambda: x.clone().__setitem__(x > 0, 0.0),
    ):
        with SyncRecorder() as recorder:
            sync()
        assert recorder.syncs, sync
    with SyncRecorder() as recorder:
        torch.where(x > 0, x, 0.0).sum()
    assert recorder.syncs == []


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_a_step_that_does_not_log_has_no_host_sync(
    tiny_store: ActivationStore, tmp_path: Path, arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step as it runs on CUDA (the CPU keeps its faster data-dependent forms), with dead
    latents from the start so that AuxK runs too."""
    monkeypatch.setattr(sae_module, "SYNC_FREE_DEVICES", {"cpu", "cuda"})
    cfg = train_config(tiny_store, tmp_path, arch=arch, dead_tokens=1)
    state = init_hook_state(cfg, tiny_store, HOOK)
    batches = tiny_store.batches(cfg.batch_size, cfg.seed, [HOOK])
    dist = Distributed()
    # host-side row selection and the copy to the device happen outside the step
    x0, x1, x2 = (device_rows(cfg, state.sae, next(batches)[HOOK], dist) for _ in range(3))
    _train_hook(cfg, state, x0, 0, 40, 1e-3, dist, log=False)  # sets θ and the cut hint
    with SyncRecorder() as recorder:
        row = _train_hook(cfg, state, x1, 1, 40, 1e-3, dist, log=False)
    assert recorder.syncs == [], f"{arch}: a non-logging step synced in {recorder.syncs}"
    assert row == {}
    with SyncRecorder() as recorder:  # a logging step reads its numbers back
        row = _train_hook(cfg, state, x2, 2, 40, 1e-3, dist, log=True)
    assert "Tensor.tolist" in recorder.syncs and row["fvu"] > 0 and row["l0"] > 0


def _sae(arch: str) -> SAE:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=12, n_latents=48, arch=arch, k=4, input_scale=0.7)).double()
    with torch.no_grad():
        sae.b_enc.normal_(std=0.3)
        sae.b_dec.normal_()
    return sae


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("n_dead", [0, 3, 30])
def test_the_sync_free_step_matches_the_cpu_step(
    arch: str, n_dead: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same losses and gradients from the fixed-shape forms (exhaustive BatchTopK, masked AuxK;
    fewer dead latents than aux_k, more, and none) as from the data-dependent ones."""
    x = torch.randn(40, 12, dtype=torch.float64) * 2 + 1
    dead = torch.zeros(48, dtype=torch.bool)
    dead[torch.randperm(48)[:n_dead]] = True
    results = []
    for devices in ({"cuda"}, {"cpu", "cuda"}):
        monkeypatch.setattr(sae_module, "SYNC_FREE_DEVICES", devices)
        sae = _sae(arch)
        sae.threshold.fill_(0.5)  # the hint path of the CPU's BatchTopK
        out = sae.training_forward(x, dead=dead, aux_k=6)
        (out.fvu + out.aux_loss).backward()
        grads = [p.grad for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
        results.append((out.fvu, out.aux_loss, out.code.to_dense(48), sae.threshold, *grads))
    assert results[0][1] > 0 if n_dead else results[0][1] == 0
    for cpu_form, sync_free in zip(*results, strict=True):
        torch.testing.assert_close(sync_free, cpu_form)


def test_row_offsets_are_where_each_row_starts() -> None:
    rows = torch.tensor([0, 0, 2, 2, 2, 3, 5])
    counts = torch.bincount(rows, minlength=7)
    assert row_offsets(rows, 7).tolist() == (torch.cumsum(counts, 0) - counts).tolist()
    assert row_offsets(rows, 7).tolist() == [0, 2, 2, 5, 6, 6, 7]


def test_update_threshold_keeps_theta_without_a_positive_value() -> None:
    sae = _sae("batchtopk")
    sae.update_threshold(torch.tensor([0.0, -1.0], dtype=torch.float64))  # nothing positive
    assert float(sae.threshold) == 0 and sae.cut_hint() == 0
    sae.update_threshold(torch.tensor([0.0, 2.0, 3.0], dtype=torch.float64))  # first: the min
    assert float(sae.threshold) == 2 and sae.cut_hint() == pytest.approx(0.85 * 2)
    sae.update_threshold(torch.tensor([1.0, 5.0], dtype=torch.float64))
    assert float(sae.threshold) == pytest.approx(0.99 * 2 + 0.01 * 1)
    sae.update_threshold(torch.tensor([-2.0], dtype=torch.float64))
    assert float(sae.threshold) == pytest.approx(0.99 * 2 + 0.01 * 1)
    assert sae.cut_hint() == pytest.approx(0.85)


def test_device_rows_drop_exactly_the_passthrough_rows(
    tiny_store: ActivationStore, tmp_path: Path
) -> None:
    cfg = train_config(tiny_store, tmp_path)
    state = init_hook_state(cfg, tiny_store, HOOK)
    batch = next(tiny_store.batches(cfg.batch_size, cfg.seed, [HOOK]))[HOOK].clone()
    batch[[3, 7]] *= 1e3  # two massive rows
    x = device_rows(cfg, state.sae, batch, Distributed())
    keep = torch.ones(len(batch), dtype=torch.bool)
    keep[[3, 7]] = False
    torch.testing.assert_close(x, batch[keep].to(cfg.device), rtol=0, atol=0)
