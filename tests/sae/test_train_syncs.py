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

from sae.distributed import Distributed
from sae.init import init_hook_state
from sae.store import ActivationStore
from sae.train import _train_hook
from tests.sae.conftest import HOOK, train_config

aten = torch.ops.aten
# ops whose result the host must wait for: a scalar read back, or an output shape set by the data
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}
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
    tiny_store: ActivationStore, tmp_path: Path, arch: str
) -> None:
    cfg = train_config(tiny_store, tmp_path, arch=arch)
    state = init_hook_state(cfg, tiny_store, HOOK)
    batches = tiny_store.batches(cfg.batch_size, cfg.seed, [HOOK])
    first, second = next(batches)[HOOK], next(batches)[HOOK]
    dist = Distributed()
    _train_hook(cfg, state, first, 0, 40, 1e-3, dist)  # the first step sets θ and the cut hint
    with SyncRecorder() as recorder:
        _train_hook(cfg, state, second, 1, 40, 1e-3, dist)
    assert recorder.syncs == [], f"{arch}: a non-logging step synced in {recorder.syncs}"
