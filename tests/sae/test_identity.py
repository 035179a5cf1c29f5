"""Model identity: every artefact records the model it was made from, and using it with another
model is refused before any work (sae.identity.check_model_matches)."""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import pytest
import torch

from sae.harvest import harvest
from sae.identity import ModelMismatchError, check_model_matches
from sae.init import init_sae
from sae.io import load_sae, save_sae
from sae.models import LoadedModel, load_model
from sae.sae import SAE, SAEConfig
from sae.store import MANIFEST, ActivationStore
from sae.train import train
from tests.conftest import tiny_harvest_config
from tests.sae.conftest import HOOK, train_config


def test_the_record_names_spec_family_weights_and_dtype(tiny: LoadedModel) -> None:
    record = tiny.identity()
    assert record == {
        "spec": "tiny",
        "family": "llama",
        "revision": "",
        "weights_sha256": tiny.weights_sha256,
        "dtype": "float32",
    }


def test_the_store_and_the_sae_keep_the_record(
    tiny: LoadedModel, tiny_store: ActivationStore, tmp_path: Path
) -> None:
    assert tiny_store.manifest.model_record == tiny.identity()
    cfg = train_config(tiny_store, tmp_path / "run")
    sae = init_sae(cfg, tiny_store, HOOK)
    assert sae.cfg.model_record == tiny.identity()
    assert load_sae(save_sae(sae, tmp_path / "sae")).cfg.model_record == tiny.identity()


def test_each_kind_of_mismatch_is_refused(tiny: LoadedModel) -> None:
    record = tiny.identity()
    check_model_matches("x", tiny, record, tiny.d_model, [HOOK])  # the same model passes
    with pytest.raises(ModelMismatchError, match="d_model 32 but tiny has 64"):
        check_model_matches("x", tiny, record, 32)
    with pytest.raises(ModelMismatchError, match=r"blocks\.9\.hook_resid_post.*layers 0\.\.2"):
        check_model_matches("x", tiny, record, hooks=["blocks.9.hook_resid_post"])
    with pytest.raises(ModelMismatchError, match="made from a gemma2 model"):
        check_model_matches("x", tiny, {**record, "family": "gemma2"})
    with pytest.raises(ModelMismatchError, match="other weights"):
        check_model_matches("x", tiny, {**record, "weights_sha256": "0" * 64})
    with pytest.raises(ModelMismatchError, match="other weights"):  # an older artefact's field
        check_model_matches("x", tiny, {}, weights_sha256="0" * 64)


def test_an_artefact_without_a_record_still_loads_with_a_warning(tiny: LoadedModel) -> None:
    with pytest.warns(UserWarning, match="does not record which weights"):
        check_model_matches("old SAE", tiny, {}, tiny.d_model, [HOOK])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a legacy weights_sha256 is enough: no warning
        check_model_matches("old SAE", tiny, {}, tiny.d_model, [HOOK], tiny.weights_sha256)


def test_an_old_store_without_a_record_resumes(tiny: LoadedModel, tmp_path: Path) -> None:
    cfg = tiny_harvest_config(tmp_path / "s", tokens=600)
    harvest(cfg, tiny)
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    del manifest["model_record"]
    manifest["complete"] = False
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(manifest))
    store = harvest(tiny_harvest_config(tmp_path / "s", tokens=600), tiny)
    assert store.manifest.complete and store.manifest.model_record == {}


def test_resuming_a_store_with_another_model_is_refused(tiny: LoadedModel, tmp_path: Path) -> None:
    cfg = tiny_harvest_config(tmp_path / "s", tokens=600, model="tiny-mistral")
    harvest(cfg, load_model("tiny-mistral"))
    with pytest.raises(ModelMismatchError, match="made from a mistral model.*tiny-mistral"):
        harvest(tiny_harvest_config(tmp_path / "s", tokens=600), tiny)


def test_sae_training_refuses_a_store_from_another_model(
    tiny_store: ActivationStore, tmp_path: Path
) -> None:
    with pytest.raises(ModelMismatchError, match="made from a llama model.*tiny.*gpt2"):
        train(train_config(tiny_store, tmp_path / "run", model="tiny-gpt2"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ------------------------------------------------------------- probes, Lens, serving, command lines


def _foreign(tiny: LoadedModel) -> dict:
    return {**tiny.identity(), "spec": "tiny-mistral", "family": "mistral"}


def test_lens_refuses_a_probe_of_another_model_and_probe_json_keeps_the_record(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    from probes.lens import Lens
    from probes.probe import Probe

    probe = Probe("linear", HOOK, 64, "mean", torch.zeros(64), 0.0, model_record=_foreign(tiny))
    assert Probe.load(probe.save(tmp_path / "p")).model_record == _foreign(tiny)
    with pytest.raises(ModelMismatchError, match="probe 'linear-0' was made from a mistral"):
        Lens(tiny, probes=[probe])
    probe.model_record = tiny.identity()
    Lens(tiny, probes=[probe])  # its own model: accepted


def test_the_serving_hook_refuses_an_sae_of_another_model(tiny: LoadedModel) -> None:
    from serve_hooks.config import EngineConfig
    from serve_hooks.engine import LLMEngine
    from serve_hooks.hook import FeatureHook

    sae = SAE(SAEConfig(d_in=64, n_latents=128, k=4, hook=HOOK, model_record=_foreign(tiny)))
    engine = LLMEngine(EngineConfig(model="tiny", num_blocks=16, device="cpu"), tiny)
    with pytest.raises(ModelMismatchError, match=f"the SAE at {HOOK} was made from a mistral"):
        FeatureHook(engine, saes=[sae])
    assert engine.hooks == []  # refused before attaching


@pytest.mark.parametrize(
    "argv",
    [
        "sae harvest",
        "sae train",
        "sae eval",
        "probes train",
        "probes score",
        "graphs explain",
        "graphs eval",
        "graphs export",
        "serve_hooks serve",
    ],
)
def test_every_job_that_runs_a_model_takes_device_and_dtype(
    argv: str, capsys: pytest.CaptureFixture
) -> None:
    package, command = argv.split()
    main = importlib.import_module(f"{package}.__main__").main
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = capsys.readouterr().out
    assert "--device" in help_text
    if argv != "sae train":  # SAE training runs no model: only a device
        assert "--dtype" in help_text and "bfloat16" in help_text


def test_a_device_that_is_not_here_fails_before_work(tmp_path: Path, capsys) -> None:
    from sae.__main__ import main

    argv = ["harvest", "--model", "tiny", "--out", str(tmp_path / "s"), "--device", "gpu0"]
    assert main(argv) == 2
    assert "unknown device 'gpu0'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
