from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae.io import export_saelens, import_saelens, load_sae, save_sae
from sae.models import cache_root
from sae.sae import SAE, SAEConfig

ARCHS = ["topk", "batchtopk", "jumprelu", "relu", "matryoshka"]
SAELENS_PYTHON = cache_root() / "venvs" / "saelens" / "bin" / "python"


def _trained_like_sae(arch: str) -> SAE:
    """An SAE with non-trivial biases, scale and threshold, as training would leave it."""
    g = torch.Generator().manual_seed(0)
    sae = SAE(
        SAEConfig(
            d_in=16,
            n_latents=64,
            arch=arch,
            k=6,
            input_scale=0.37,
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
    return torch.randn(50, 16, generator=torch.Generator().manual_seed(1)) * 4 + 2


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_round_trip(arch: str, tmp_path: Path) -> None:
    sae = _trained_like_sae(arch)
    loaded = load_sae(save_sae(sae, tmp_path / "sae"))
    assert loaded.cfg == sae.cfg
    torch.testing.assert_close(loaded(_x()), sae(_x()), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_export_computes_the_same_code_and_reconstruction(
    arch: str, tmp_path: Path
) -> None:
    sae = _trained_like_sae(arch)
    export_saelens(sae, tmp_path / "lens")
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    weights = load_file(tmp_path / "lens" / "sae_weights.safetensors")
    assert weights["W_enc"].shape == (16, 64)
    assert cfg["d_sae"] == 64 and cfg["hook_name"] == sae.cfg.hook
    back = import_saelens(tmp_path / "lens")
    # the scale now lives in the weights
    assert back.cfg.arch == arch and back.cfg.input_scale == 1.0
    x = _x()
    torch.testing.assert_close(back(x), sae(x), rtol=1e-5, atol=1e-5)
    ours, theirs = sae.encode(x).to_dense(64), back.encode(x).to_dense(64)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_loading_a_saelens_layout_with_load_sae_says_how(tmp_path: Path) -> None:
    export_saelens(_trained_like_sae("topk"), tmp_path)
    with pytest.raises(FileNotFoundError, match="use import_saelens"):
        load_sae(tmp_path)


_SAELENS_SCRIPT = """
import sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from sae_lens import SAE
x = load_file(sys.argv[1])["x"]
for directory in sys.argv[2:]:
    sae = SAE.load_from_disk(directory, device="cpu")
    with torch.no_grad():
        outputs = {"recons": sae(x), "acts": sae.encode(x)}
        save_file(outputs, str(Path(directory) / "out.safetensors"))
"""


@pytest.mark.skipif(
    not SAELENS_PYTHON.exists(), reason="no SAELens side venv (scripts/bench_harvest.py creates it)"
)
def test_saelens_itself_loads_our_exports(tmp_path: Path) -> None:
    saes = {arch: _trained_like_sae(arch) for arch in ["topk", "batchtopk", "jumprelu", "relu"]}
    for arch, sae in saes.items():
        export_saelens(sae, tmp_path / arch)
    save_file({"x": _x()}, tmp_path / "x.safetensors")
    script = tmp_path / "run.py"
    script.write_text(_SAELENS_SCRIPT)
    args = [
        str(SAELENS_PYTHON),
        str(script),
        str(tmp_path / "x.safetensors"),
        *(str(tmp_path / a) for a in saes),
    ]
    result = subprocess.run(
        args, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    )
    assert result.returncode == 0, result.stderr[-1500:]
    for arch, sae in saes.items():
        out = load_file(tmp_path / arch / "out.safetensors")
        torch.testing.assert_close(out["recons"], sae(_x()), rtol=1e-4, atol=1e-4, msg=arch)
        torch.testing.assert_close(
            out["acts"], sae.encode(_x()).to_dense(64), rtol=1e-4, atol=1e-4, msg=arch
        )
