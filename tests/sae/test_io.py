"""SAE files: greylens's layout round-trips bit for bit; the SAELens export computes the same code
and reconstruction, keeps the passthrough limit for massive activations (restored by
import_saelens, shown to SAELens users in cfg.json's metadata and the README), and SAELens itself
loads it — every architecture, trained by the real trainer."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae.io import export_saelens, import_saelens, load_sae, save_sae
from sae.models import cache_root
from sae.sae import ARCHITECTURES, SAE, SAEConfig
from sae.store import ActivationStore
from sae.train import train
from tests.sae.conftest import HOOK, train_config

ARCHS = list(ARCHITECTURES)  # topk, batchtopk, jumprelu, relu, matryoshka (no transcoder arch)
SAELENS_PYTHON = cache_root() / "venvs" / "saelens" / "bin" / "python"
N_MASSIVE = 4  # rows of each input scaled past the SAE's passthrough limit


def _trained_like_sae(arch: str) -> SAE:
    """An SAE with non-trivial biases, scale, threshold and passthrough limit."""
    g = torch.Generator().manual_seed(0)
    sae = SAE(
        SAEConfig(
            d_in=16,
            n_latents=64,
            arch=arch,
            k=6,
            input_scale=0.37,
            max_input_norm=60.0,
            hook="blocks.1.hook_resid_post",
            model="tiny",
        )
    )
    sae.reset_parameters(g)
    with torch.no_grad():
        sae.b_enc.normal_(generator=g, std=0.3)
        sae.b_dec.normal_(generator=g)
        sae.threshold.fill_(0.4)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.rand(64, generator=g).log())
    return sae


def _x() -> torch.Tensor:
    """[50, 16]: norms ≈ 20, the first N_MASSIVE rows ≈ 600 (over the limit of 60)."""
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(1)) * 4 + 2
    x[:N_MASSIVE] *= 30
    return x


@pytest.fixture(scope="module")
def trained(tiny_store: ActivationStore, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """{arch: SAE} trained on the tiny store by sae.train (its passthrough limit: 10× the median
    norm), and inputs x: [200, d] store rows, the first N_MASSIVE scaled 30× past that limit."""
    saes = {}
    for arch in ARCHS:
        out = tmp_path_factory.mktemp(f"trained-{arch}")
        train(train_config(tiny_store, out, arch=arch, tokens=256 * 10))
        saes[arch] = load_sae(out / HOOK)
    x = tiny_store.rows(torch.arange(200), hooks=[HOOK])[HOOK].float()  # [200, d_model]
    x[:N_MASSIVE] *= 30
    return {"saes": saes, "x": x}


def _assert_passthrough(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """The inputs really test the limit: exactly the first N_MASSIVE rows are over it."""
    massive = sae.passthrough(x)  # [N] bool
    assert sae.cfg.max_input_norm > 0
    assert massive[:N_MASSIVE].all() and not massive[N_MASSIVE:].any()
    return massive


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_round_trip(arch: str, tmp_path: Path) -> None:
    sae = _trained_like_sae(arch)
    loaded = load_sae(save_sae(sae, tmp_path / "sae"))
    assert loaded.cfg == sae.cfg
    torch.testing.assert_close(loaded(_x()), sae(_x()), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_round_trip_of_a_trained_sae_keeps_its_semantics(
    arch: str, trained: dict, tmp_path: Path
) -> None:
    sae, x = trained["saes"][arch], trained["x"]
    massive = _assert_passthrough(sae, x)
    back = import_saelens(export_saelens(sae, tmp_path / "lens"))
    # everything but the scale, which now lives in the weights
    assert back.cfg == SAEConfig(**{**sae.cfg.__dict__, "input_scale": 1.0})
    n = sae.cfg.n_latents
    ours, theirs = sae.encode(x).to_dense(n), back.encode(x).to_dense(n)  # [N, n_latents]
    assert (ours != 0).any() and not theirs[massive].any()  # massive rows: no code
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    recons = back(x)  # [N, d]
    assert torch.equal(recons[massive], x[massive])  # passed through, bit for bit
    torch.testing.assert_close(recons, sae(x), rtol=1e-5, atol=1e-4)


def test_saelens_export_writes_the_limit_where_saelens_users_see_it(tmp_path: Path) -> None:
    sae = _trained_like_sae("topk")
    export_saelens(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    weights = load_file(tmp_path / "sae_weights.safetensors")
    assert weights["W_enc"].shape == (16, 64)
    assert cfg["d_sae"] == 64 and cfg["hook_name"] == sae.cfg.hook and cfg["k"] == 6
    assert cfg["metadata"]["greylens_max_input_norm"] == 60.0
    assert "pass through unchanged" in cfg["metadata"]["greylens_passthrough"]
    readme = (tmp_path / "README.md").read_text()
    assert "exceeds 60 through unchanged" in readme and "greylens_max_input_norm" in readme
    sae.cfg.max_input_norm = 0.0
    export_saelens(sae, tmp_path)
    assert "encodes every row" in (tmp_path / "README.md").read_text()


def test_import_of_an_export_without_the_full_config_still_restores_the_limit(
    tmp_path: Path,
) -> None:
    """Exports written before `greylens_cfg` existed (and hand-edited ones) keep arch and limit."""
    sae = _trained_like_sae("batchtopk")
    export_saelens(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["metadata"]["greylens_cfg"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    back = import_saelens(tmp_path)
    assert back.cfg.arch == "batchtopk" and back.cfg.max_input_norm == 60.0
    torch.testing.assert_close(back(_x()), sae(_x()), rtol=1e-5, atol=1e-4)


def test_import_refuses_metadata_of_another_sae_or_a_newer_greylens(tmp_path: Path) -> None:
    export_saelens(_trained_like_sae("relu"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["metadata"]["greylens_cfg"]["n_latents"] = 32
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="belongs to another SAE"):
        import_saelens(tmp_path)
    cfg["metadata"]["greylens_cfg"].update(n_latents=64, new_knob=1)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"does not know \(new_knob\).*upgrade"):
        import_saelens(tmp_path)


def test_loading_a_saelens_layout_with_load_sae_says_how(tmp_path: Path) -> None:
    export_saelens(_trained_like_sae("topk"), tmp_path)
    with pytest.raises(FileNotFoundError, match="use import_saelens"):
        load_sae(tmp_path)


# Runs in the SAELens side venv: SAELens's own outputs, the limit as SAELens shows it, and the
# README's snippet (executed as written) applied to SAELens's SAE.
_SAELENS_SCRIPT = """
import re, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from sae_lens import SAE
x = load_file(sys.argv[1])["x"]
for directory in sys.argv[2:]:
    sae = SAE.load_from_disk(directory, device="cpu")
    readme = (Path(directory) / "README.md").read_text()
    snippet = re.search(r"```python\\n(.*?)```", readme, re.S)[1]
    scope = {"torch": torch, "sae": sae, "x": x}
    with torch.no_grad():
        plain = {"recons": sae(x), "acts": sae.encode(x)}
        exec(snippet, scope)
    outputs = {**plain, "rule_recons": scope["recons"], "rule_acts": scope["acts"],
               "limit": torch.tensor(sae.cfg.metadata.greylens_max_input_norm)}
    save_file(outputs, str(Path(directory) / "out.safetensors"))
"""


@pytest.mark.skipif(
    not SAELENS_PYTHON.exists(), reason="no SAELens side venv: run `make saelens-venv`"
)
def test_saelens_itself_loads_our_trained_exports(trained: dict, tmp_path: Path) -> None:
    saes, x = trained["saes"], trained["x"]
    for arch, sae in saes.items():
        export_saelens(sae, tmp_path / arch)
    save_file({"x": x}, tmp_path / "x.safetensors")
    script = tmp_path / "run.py"
    script.write_text(_SAELENS_SCRIPT)
    args = [str(SAELENS_PYTHON), str(script), str(tmp_path / "x.safetensors")]
    result = subprocess.run(
        [*args, *(str(tmp_path / a) for a in saes)],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-1500:]
    for arch, sae in saes.items():
        out, massive = load_file(tmp_path / arch / "out.safetensors"), _assert_passthrough(sae, x)
        keep, recons = ~massive, sae(x)  # [N], [N, d]
        acts = sae.encode(x).to_dense(sae.cfg.n_latents)  # [N, n_latents]
        close = dict(rtol=1e-4, atol=1e-4, msg=arch)
        # SAELens's own class: the same code and reconstruction on every ordinary row...
        torch.testing.assert_close(out["recons"][keep], recons[keep], **close)
        torch.testing.assert_close(out["acts"][keep], acts[keep], **close)
        # ...it knows nothing of passthrough (it encodes the massive rows), but it shows the
        # limit, and the README's rule applied to it gives greylens's outputs on every row
        assert out["acts"][massive].any(), arch
        assert float(out["limit"]) == pytest.approx(sae.cfg.max_input_norm), arch
        torch.testing.assert_close(out["rule_recons"], recons, **close)
        assert torch.equal(out["rule_recons"][massive], x[massive]), arch
        torch.testing.assert_close(out["rule_acts"], acts, **close)
