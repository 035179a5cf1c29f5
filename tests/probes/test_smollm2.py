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


MODERN_PROSE = [
    "The weather today is sunny with a light breeze, and it should stay warm until the evening.",
    "What is the capital of France?",
    "Why is the sky blue?",
    "Can you recommend a good book to read this summer?",
]
CODE = [
    "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))",
    "import os\nfor name in sorted(os.listdir(path)):\n    if name.endswith('.py'):\n"
    "        print(name)",
]


@pytest.mark.slow
def test_code_probe_is_silent_on_modern_prose_and_fires_on_code(smollm2, tmp_path):
    # The demo's code probe: modern + old English negatives, calibrated on the monitor's score.
    cfg = ProbeTrainConfig(
        task="code",
        hook=HOOK,
        out=str(tmp_path / "code"),
        n_per_class=150,
        calibrate_on="monitor",
        min_tokens=8,
    )
    probe = train_probe(cfg, smollm2)
    lens = Lens(smollm2, probes=[tmp_path / "code"])
    results = lens.score(MODERN_PROSE + CODE)
    for r in results[: len(MODERN_PROSE)]:
        assert r.probes["code"].score < probe.threshold, (r.text, r.probes["code"].score)
    for r in results[len(MODERN_PROSE) :]:
        assert r.probes["code"].score > probe.threshold, (r.text, r.probes["code"].score)
    assert lens.monitor("The weather today is", 16, trigger="code", action="none").triggered is None
    assert lens.monitor("def add(a, b):", 16, trigger="code", action="none").triggered is not None
