from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae import metrics
from sae.__main__ import main
from sae.evaluate import reconstruction_metrics, splice_metrics
from sae.io import save_sae
from sae.models import LoadedModel
from sae.sae import SAE, SAEConfig
from sae.store import ActivationStore

HOOK = "blocks.1.hook_resid_post"


def _identity_sae(model: LoadedModel) -> SAE:
    """ReLU SAE with latents [x, −x]: relu(x) − relu(−x) = x, an exact reconstruction."""
    d = model.d_model
    sae = SAE(
        SAEConfig(
            d_in=d,
            n_latents=2 * d,
            arch="relu",
            hook=HOOK,
            model=model.name,
            weights_sha256=model.weights_sha256,
        )
    )
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
    return sae


def _windows(model: LoadedModel) -> torch.Tensor:
    body = torch.randint(
        0, len(model.tokenizer), (4, 23), generator=torch.Generator().manual_seed(0)
    )
    return torch.cat([torch.full((4, 1), model.bos_token_id), body], dim=1)


def test_an_exact_sae_recovers_all_of_the_loss(tiny: LoadedModel) -> None:
    result = splice_metrics(tiny, _identity_sae(tiny), _windows(tiny))
    assert result["ce_spliced"] == pytest.approx(result["ce_clean"], abs=1e-5)
    assert result["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert result["kl_spliced"] == pytest.approx(0.0, abs=1e-6) and result["kl_zero_ablated"] > 0
    assert result["predictions"] == 4 * 22


def test_zero_reconstruction_recovers_none(tiny: LoadedModel) -> None:
    sae = _identity_sae(tiny)
    with torch.no_grad():
        sae.W_dec.zero_()  # reconstruction = b_dec = 0: the same as zero-ablation
    result = splice_metrics(tiny, sae, _windows(tiny))
    assert result["ce_spliced"] == pytest.approx(result["ce_zero_ablated"], abs=1e-5)
    assert result["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-4)


def test_reconstruction_metrics_equal_the_one_shot_definitions(
    tiny: LoadedModel, tiny_store: ActivationStore
) -> None:
    sae = _identity_sae(tiny)
    with torch.no_grad():
        sae.W_enc[:5] = 0  # five latents never fire; the rest reconstruct all but 5 coordinates
    result = reconstruction_metrics(sae, tiny_store, batch_size=700)
    x = tiny_store.rows(torch.arange(len(tiny_store)), hooks=[HOOK])[HOOK]
    code = sae.encode(x)
    assert result["fvu"] == pytest.approx(metrics.fvu(x, sae.decode(code)), rel=1e-6)
    assert result["l0"] == pytest.approx(metrics.l0(code.to_dense(sae.cfg.n_latents)), rel=1e-9)
    assert result["dead_fraction"] == pytest.approx(5 / sae.cfg.n_latents)


def test_eval_command_prints_json(
    tiny: LoadedModel, tiny_store: ActivationStore, tmp_path: Path, capsys
) -> None:
    save_sae(_identity_sae(tiny), tmp_path / "sae")
    args = [
        "eval",
        "--sae",
        str(tmp_path / "sae"),
        "--store",
        str(tiny_store.directory),
        "--model",
        "tiny",
        "--tokens",
        "200",
        "--context-size",
        "32",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fvu"] == pytest.approx(0.0, abs=1e-9) and result[
        "ce_loss_recovered"
    ] == pytest.approx(1.0, abs=1e-4)
