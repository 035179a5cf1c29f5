from __future__ import annotations

import json

import pytest

from sae.__main__ import main
from sae.cli import field_docs
from sae.harvest import HarvestConfig
from sae.store import ActivationStore


def test_info_prints_the_manifest_summary(
    tiny_store: ActivationStore, capsys: pytest.CaptureFixture
) -> None:
    assert main(["info", str(tiny_store.directory), "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_tokens"] == len(tiny_store) and info["complete"] is True
    assert info["hooks"] == tiny_store.hooks and info["bytes"] > 0


def test_harvest_with_a_bad_hook_exits_2_with_the_reason(
    tmp_path, capsys: pytest.CaptureFixture
) -> None:
    code = main(
        [
            "harvest",
            "--model",
            "tiny",
            "--hooks",
            "blocks.0.hook_resid_pst",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert code == 2
    assert "closest valid names: blocks.0.hook_resid_post" in capsys.readouterr().err


def test_every_config_field_has_help_text(capsys: pytest.CaptureFixture) -> None:
    docs = field_docs(HarvestConfig)
    assert set(docs) == set(HarvestConfig.__dataclass_fields__)
    with pytest.raises(SystemExit):
        main(["harvest", "--help"])
    assert docs["keep_bos"].split(";")[0] in " ".join(capsys.readouterr().out.split())
