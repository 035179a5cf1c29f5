from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sae.harvest import harvest
from sae.models import LoadedModel
from sae.store import ROW_COLUMNS, ActivationStore, StoreError
from tests.conftest import tiny_harvest_config

HOOK = "blocks.1.hook_resid_post"


def test_manifest_records_the_harvest(tiny_store: ActivationStore, tiny: LoadedModel) -> None:
    m = tiny_store.manifest
    assert m.complete and m.format_version == 1
    assert m.weights_sha256 == tiny.weights_sha256 and m.d_model == tiny.d_model
    assert len(tiny_store) == m.n_tokens >= m.n_tokens_target
    assert len(m.shards) > 3 and all(len(s.sha256) == 64 for s in m.shards)


def test_random_access_returns_the_rows_asked_for(tiny_store: ActivationStore) -> None:
    shard1 = tiny_store.shard(1)
    offset = tiny_store.manifest.shards[0].n_tokens
    rows = tiny_store.rows([offset + 5, 2, offset + 5])
    torch.testing.assert_close(rows[HOOK][0], shard1[HOOK][5].float())
    torch.testing.assert_close(rows[HOOK][1], tiny_store.shard(0)[HOOK][2].float())
    assert rows[HOOK][0].equal(rows[HOOK][2]) and rows["token_ids"][0] == shard1["token_ids"][5]
    with pytest.raises(IndexError):
        tiny_store.rows([len(tiny_store)])


def test_shuffled_batches_cover_every_row_once_and_are_seeded(tiny_store: ActivationStore) -> None:
    order = tiny_store.epoch_order(seed=7)
    assert sorted(order.tolist()) == list(range(len(tiny_store)))
    assert not order.equal(torch.arange(len(tiny_store)))
    assert order.equal(ActivationStore(tiny_store.directory).epoch_order(seed=7))
    assert not order.equal(tiny_store.epoch_order(seed=7, epoch=1))
    batches = list(tiny_store.batches(batch_size=256, seed=7))
    assert sum(len(b["token_ids"]) for b in batches) == len(tiny_store)
    assert batches[0][HOOK].dtype == torch.float32 and batches[0][HOOK].shape == (256, 64)
    resumed = next(tiny_store.batches(batch_size=256, seed=7, start_batch=3))
    assert resumed[HOOK].equal(batches[3][HOOK])


def test_shards_are_memory_mapped_not_copied(tiny_store: ActivationStore) -> None:
    tensor = tiny_store.shard(0)[HOOK]
    assert not tensor.untyped_storage().resizable()  # mmap-backed storage can't be resized


def test_to_hf_dataset_round_trips(tiny_store: ActivationStore) -> None:
    ds = tiny_store.to_hf_dataset()
    assert len(ds) == len(tiny_store)
    assert set(ds.column_names) == set(tiny_store.hooks) | set(ROW_COLUMNS)
    row = tiny_store.rows([10])
    assert torch.tensor(ds[10][HOOK]).equal(row[HOOK][0])
    assert ds[10]["doc_ids"] == row["doc_ids"][0].item()


def test_corrupted_shard_is_named_in_the_error(tiny_store: ActivationStore, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_store.directory, copy)
    shard = copy / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    store = ActivationStore(copy)
    store.rows([0])  # shard 0 is fine
    with pytest.raises(StoreError, match="shard-00002.safetensors is corrupted"):
        store.shard(2)
    with pytest.raises(StoreError, match="shard-00002"):
        ActivationStore(copy, verify=False).verify()


def test_store_model_mismatch_is_refused(tiny_store: ActivationStore, tiny: LoadedModel) -> None:
    tiny_store.check_model(tiny.name, tiny.weights_sha256, tiny.d_model)
    with pytest.raises(StoreError, match="d_model"):
        tiny_store.check_model(tiny.name, tiny.weights_sha256, 576)
    with pytest.raises(StoreError, match="weights sha256"):
        tiny_store.check_model("smollm2-135m", "0" * 64, tiny.d_model)


def test_resuming_with_other_arguments_is_refused(
    tiny_store: ActivationStore, tiny: LoadedModel
) -> None:
    cfg = tiny_harvest_config(tiny_store.directory, seed=4)
    with pytest.raises(StoreError, match="seed: store has 3, this run 4"):
        harvest(cfg, tiny)


def test_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore(tmp_path)


def test_manifest_missing_fields_is_a_clear_error(
    tiny_store: ActivationStore, tmp_path: Path
) -> None:
    import json

    copy = tmp_path / "copy"
    shutil.copytree(tiny_store.directory, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    del raw["d_model"], raw["split"]  # split has a default (older stores); d_model does not
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(StoreError, match="lacks d_model"):
        ActivationStore(copy)
