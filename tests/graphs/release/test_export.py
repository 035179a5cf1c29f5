"""The export (graphs.release.export): refusals, an export killed mid-way then resumed, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graphs.release import load_release
from graphs.release.export import ExportConfig, export_release
from tests.graphs.conftest import TARGET_HOOK, TinyGraph, release_config


def test_unfinished_and_mismatched_exports_are_refused(
    tiny_graph: TinyGraph, tiny_release: Path, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError, match="not a finished greylens release"):
        load_release(tmp_path)
    # finished: nothing to do
    assert export_release(release_config(tiny_graph, tiny_release)) == tiny_release
    with pytest.raises(ValueError, match="top_k"):
        export_release(release_config(tiny_graph, tiny_release, top_k=3))
    wrong = release_config(
        tiny_graph, tmp_path / "wrong", sae=str(tiny_graph.sae_dirs / TARGET_HOOK)
    )
    with pytest.raises(ValueError, match="pass the graph trained from this SAE"):
        export_release(wrong)
    assert not (tmp_path / "wrong.partial").exists()  # refused before anything was written


# The export CLI with each scan batch slowed by 0.25 s, so that the kill below lands mid-scan
# however
# slowly this process polls on a loaded machine (at full speed the tiny export can finish first).
_SLOW_EXPORT = (
    "import sys, time, graphs.release.scan as scan; batch = scan.scan_batch; "
    "scan.scan_batch = lambda *a, **k: (time.sleep(0.25), batch(*a, **k))[1]; "
    "from graphs.__main__ import main; main(sys.argv[1:])"
)


def _scanned_batches(log: Path) -> int:
    """Batches the scan has checkpointed so far (a line still being written is skipped)."""
    text = log.read_text() if log.exists() else ""
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    return max((json.loads(line).get("batches", [0, 0])[1] for line in lines), default=0)


def _kill_mid_scan(cfg: ExportConfig) -> None:
    """Run the export CLI and SIGKILL it once the scan has checkpointed two batches."""
    args = [sys.executable, "-c", _SLOW_EXPORT, "export"]
    for key, value in vars(cfg).items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = Path(cfg.out + ".partial") / "export_log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and _scanned_batches(log) < 2:
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the export finished before it could be killed"
    assert _scanned_batches(log) >= 2, "the export was killed before the scan checkpointed twice"


def test_killed_export_resumes_without_losing_or_repeating_work(
    tiny_graph: TinyGraph, tmp_path: Path
) -> None:
    settings = dict(batch_size=64, checkpoint_every=1, ce_tokens=0, prompts="the king said")
    cfg = release_config(tiny_graph, tmp_path / "killed", **settings)
    _kill_mid_scan(cfg)
    # atomic: no half release at OUT
    assert not Path(cfg.out).exists() and Path(cfg.out + ".partial").exists()
    with pytest.raises(FileNotFoundError, match="re-run it with the same arguments"):
        load_release(cfg.out + ".partial")
    log = Path(cfg.out + ".partial") / "export_log.jsonl"
    done_before = [json.loads(line) for line in log.read_text().splitlines()]
    export_release(cfg)  # resume
    entries = [
        json.loads(line) for line in (Path(cfg.out) / "export_log.jsonl").read_text().splitlines()
    ]
    assert entries[: len(done_before)] == done_before  # nothing lost
    scans = [e["batches"] for e in entries if e.get("stage") == "scan" and "batches" in e]
    # contiguous: no batch scanned twice
    assert [a for a, _ in scans] == [0] + [b for _, b in scans[:-1]]
    assert scans[-1][1] == -(-len(tiny_graph.store) // 64)
    stages = [e["stage"] for e in entries if e.get("done")]
    assert len(stages) == len(set(stages)) == 9  # every stage ran exactly once
    reference = export_release(release_config(tiny_graph, tmp_path / "reference", **settings))
    resumed, unbroken = load_release(cfg.out), load_release(reference)
    for name in ("features", "examples", "edges"):
        assert resumed.data[name].to_list() == unbroken.data[name].to_list()
    assert resumed.card == unbroken.card and resumed.readme == unbroken.readme


def test_export_cli_help_lists_the_release_flags(capsys: pytest.CaptureFixture) -> None:
    from graphs.__main__ import main

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    usage = capsys.readouterr().out
    assert all(
        flag in usage for flag in ("--sae", "--graph", "--store", "--out", "--top-k", "--quantiles")
    )
