"""scripts/gpu_check.py on CPU at its --smoke sizes: every family conforms, every figure is there.

The script is written for one CUDA GPU; this test keeps it from rotting where no GPU is (CI).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

from sae.families import FAMILIES

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


def test_gpu_check_smoke_runs_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
    spec.loader.exec_module(gpu_check)
    report = gpu_check.main(["--smoke", "--device", "cpu", "--out", str(tmp_path / "r.json")])

    assert set(report["conformance"]) == set(FAMILIES)
    for name, row in report["conformance"].items():
        assert row["hook_max_abs_err"] < 1e-4, name
        # the engine serves exactly the families the registry says it does, and matches generate
        assert row["engine_matches_generate"] is (True if FAMILIES[name].engine else None), name
    assert report["all_conform"] is True
    speed = report["speed"]
    assert speed["dtype"] == "float32"
    for key in (
        "matmul_flop_s",
        "forward_tok_s",
        "harvest_mid_over_forward",
        "harvest_last_over_forward",
        "sae_train_tok_s",
        "sae_flop_s_over_matmul",
    ):
        assert math.isfinite(speed[key]) and speed[key] > 0, key
    assert speed["engine"]["engine_tok_s"] > 0 and speed["engine"]["hf_generate_tok_s"] > 0
    assert (tmp_path / "r.json").read_text().strip().startswith("{")
