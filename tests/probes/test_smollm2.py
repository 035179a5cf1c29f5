"""Probes on the real model (slow): a prose-vs-code probe at layer 15 of SmolLM2."""

from __future__ import annotations

import pytest

from probes.lens import Lens
from probes.train import ProbeTrainConfig, train_probe

HOOK = "blocks.15.hook_resid_post"


@pytest.mark.slow
def test_code_probe_separates_code_from_prose(smollm2, tmp_path):
    probes = [
        train_probe(
            ProbeTrainConfig(
                task="code", hook=HOOK, kind=kind, out=str(tmp_path / kind), n_per_class=40
            ),
            smollm2,
        )
        for kind in ("linear", "mean_diff")
    ]
    # 20 held-out texts per class: prose and stdlib code are far apart at layer 15
    for probe in probes:
        assert probe.metrics["auroc"] > 0.95, probe.metrics
    code, prose = Lens(smollm2, probes=[tmp_path / "linear", tmp_path / "mean_diff"]).score(
        [
            "import os\nfor name in os.listdir(path):\n    print(name)",
            "Now is the winter of our discontent",
        ]
    )
    for name in ("linear", "mean_diff"):
        assert code.probes[name].fired and code.probes[name].probability > 0.9
        assert code.probes[name].score > prose.probes[name].score + 2.0
