from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sae.harvest import (
    HarvestBatch,
    _shard_tensors,
    corpus_windows,
    harvest,
    harvest_stream,
)
from sae.hooks import capture
from sae.models import LoadedModel
from sae.store import ActivationStore, StoreError, StoreManifest
from tests.conftest import tiny_harvest_config

REPO = Path(__file__).resolve().parents[2]


def test_stored_rows_equal_a_plain_hf_forward(
    tiny_store: ActivationStore, tiny: LoadedModel
) -> None:
    cfg = tiny_harvest_config(tiny_store.directory)
    windows = corpus_windows(cfg, tiny)
    with torch.inference_mode():
        hidden = tiny.hf(windows.tokens[:3], output_hidden_states=True).hidden_states
    per_window = cfg.context_size - 1  # BOS is not stored
    rows = tiny_store.rows(torch.arange(3 * per_window))
    for layer in (0, 1):
        expected = hidden[layer + 1][:, 1:].reshape(-1, tiny.d_model)
        torch.testing.assert_close(
            rows[f"blocks.{layer}.hook_resid_post"], expected, rtol=1e-5, atol=1e-5
        )
    assert rows["token_ids"].equal(windows.tokens[:3, 1:].reshape(-1).int())
    assert rows["positions"][:per_window].tolist() == list(range(1, cfg.context_size))
    assert rows["doc_ids"][per_window].item() == windows.doc_ids[1].item()


def test_early_exit_gives_the_same_activations_as_the_full_forward(tiny: LoadedModel) -> None:
    tokens = torch.randint(
        0, len(tiny.tokenizer), (2, 16), generator=torch.Generator().manual_seed(1)
    )
    early = capture(tiny, tokens, ["blocks.0.hook_resid_post"])["blocks.0.hook_resid_post"]
    with torch.inference_mode():
        full = tiny.hf(tokens, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(early, full, rtol=0, atol=0)


def test_stream_mode_yields_what_the_store_holds(
    tiny_store: ActivationStore, tiny: LoadedModel
) -> None:
    cfg = tiny_harvest_config(tiny_store.directory)
    streamed = list(harvest_stream(cfg, tiny))
    acts = torch.cat([b.acts["blocks.1.hook_resid_post"] for b in streamed])
    assert len(acts) == len(tiny_store)
    stored = tiny_store.rows(torch.arange(len(tiny_store)))["blocks.1.hook_resid_post"]
    torch.testing.assert_close(acts, stored, rtol=1e-5, atol=1e-5)


def test_kill_9_and_resume_ends_identical_to_an_uninterrupted_run(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    args = dict(tokens=6_000, batch_size=1, shard_tokens=310)
    reference = harvest(tiny_harvest_config(tmp_path / "reference", **args), tiny).manifest
    killed = tmp_path / "killed"
    cfg = tiny_harvest_config(killed, **args)
    command = [
        sys.executable,
        "-m",
        "sae",
        "harvest",
        "--out",
        str(killed),
        "--model",
        "tiny",
        "--hooks",
        cfg.hooks,
        "--tokens",
        str(cfg.tokens),
        "--context-size",
        str(cfg.context_size),
        "--shard-tokens",
        str(cfg.shard_tokens),
        "--batch-size",
        "1",
        "--store-dtype",
        cfg.store_dtype,
        "--seed",
        str(cfg.seed),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for kill_after in (2, 7):  # two kills, each mid-run, then a run to completion
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            manifest = killed / "manifest.json"
            if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= kill_after:
                break
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL, "the harvest finished before it could be killed"
        assert not StoreManifest.load(killed).complete
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    resumed = StoreManifest.load(killed)
    assert resumed.complete
    assert [s.sha256 for s in resumed.shards] == [s.sha256 for s in reference.shards]
    assert resumed.n_tokens == reference.n_tokens
    ActivationStore(killed).verify()


def test_unknown_hook_lists_the_closest_valid_names(tiny: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"blocks\.1\.hook_resid_post") as error:
        harvest(tiny_harvest_config(tmp_path / "s", hooks="blocks.1.hook_resid_pots"), tiny)
    assert "closest valid names" in str(error.value)
    with pytest.raises(ValueError, match="has layers 0..2"):
        harvest(tiny_harvest_config(tmp_path / "s", hooks="blocks.7.hook_resid_post"), tiny)
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_context_larger_than_the_model_allows_is_refused(tiny: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"larger than tiny allows \\({tiny.n_ctx}\\)"):
        harvest(tiny_harvest_config(tmp_path / "s", context_size=tiny.n_ctx + 1), tiny)


def test_empty_corpus_is_refused(tiny: LoadedModel, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="corpus is empty"):
        harvest(tiny_harvest_config(tmp_path / "s", corpus=str(tmp_path / "empty")), tiny)


def test_asking_for_more_tokens_than_the_corpus_holds_is_refused(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("word " * 400)
    with pytest.raises(ValueError, match="gives only"):
        harvest(
            tiny_harvest_config(tmp_path / "s", corpus=str(tmp_path / "docs"), tokens=10_000), tiny
        )


def test_output_directory_that_is_not_a_store_is_refused(tiny: LoadedModel, tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty and is not a store"):
        harvest(tiny_harvest_config(tmp_path / "s"), tiny)


def test_float16_overflow_is_an_error_that_names_the_fix() -> None:
    hook = "blocks.0.hook_resid_post"
    batch = HarvestBatch(
        {hook: torch.tensor([[1e6, 0.0]])}, *(torch.zeros(1, dtype=torch.int32),) * 3
    )
    with pytest.raises(OverflowError, match="bfloat16"):
        _shard_tensors([batch], [hook], "float16")
    assert _shard_tensors([batch], [hook], "bfloat16")[hook].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "point",
    ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"],
)
def test_fast_capture_equals_the_transformerlens_bridge(tiny: LoadedModel, point: str) -> None:
    tokens = torch.randint(
        0, len(tiny.tokenizer), (2, 20), generator=torch.Generator().manual_seed(5)
    )
    names = [f"blocks.{layer}.{point}" for layer in range(tiny.n_layers)]
    fast = capture(tiny, tokens, names)
    with torch.inference_mode():
        _, reference = tiny.bridge.run_with_cache(
            tokens, names_filter=names, return_cache_object=False
        )
    for name in names:
        torch.testing.assert_close(fast[name], reference[name], rtol=0, atol=0)


def test_other_hook_names_fall_back_to_the_bridge(tiny: LoadedModel) -> None:
    tokens = torch.randint(
        0, len(tiny.tokenizer), (1, 12), generator=torch.Generator().manual_seed(6)
    )
    names = ["blocks.1.ln2.hook_normalized", "blocks.0.hook_resid_post"]
    got = capture(tiny, tokens, names)
    with torch.inference_mode():
        _, reference = tiny.bridge.run_with_cache(
            tokens, names_filter=names, return_cache_object=False
        )
    for name in names:
        torch.testing.assert_close(got[name], reference[name], rtol=0, atol=0)


@pytest.mark.slow
def test_smollm2_fast_capture_equals_the_bridge(smollm2: LoadedModel) -> None:
    tokens = smollm2.tokenizer(
        ["Now is the winter of our discontent"], return_tensors="pt"
    ).input_ids
    names = ["blocks.15.hook_resid_post", "blocks.3.hook_resid_mid", "blocks.3.hook_mlp_out"]
    fast = capture(smollm2, tokens, names)
    with torch.inference_mode():
        _, reference = smollm2.bridge.run_with_cache(
            tokens, names_filter=names, return_cache_object=False
        )
    for name in names:
        torch.testing.assert_close(fast[name], reference[name], rtol=0, atol=0)
