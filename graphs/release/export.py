"""`python -m graphs export`: a release directory from an SAE (its graph optional) and a store.

Atomic and resumable: everything is written under OUT.partial/ (scratch state in OUT.partial/work/)
and the directory is renamed to OUT only when every stage is done, so OUT exists only complete.
OUT.partial/progress.json lists the finished stages and what the export was asked to do; a re-run
with the same arguments skips finished stages and resumes the streamed passes at their last
checkpoint; a re-run with other arguments is refused before anything is touched.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from graphs.release.build import STAGES, Builder
from graphs.release.inputs import check_inputs
from graphs.release.load import FORMAT_VERSION, PROGRESS, RELEASE_JSON
from sae.atomic import atomic_write_json
from sae.device import ComputeDtype
from sae.models import LoadedModel

LOG = "export_log.jsonl"
DEFAULT_PROMPTS = (
    "And God said, Let there be light: and there was light.|"
    "To be, or not to be, that is the question"
)


@dataclass
class ExportConfig:
    sae: str = ""
    """SAE directory (cfg.json + sae.safetensors) whose features are released."""
    graph: str = ""
    """Graph autoencoder directory trained from that SAE (`python -m graphs train`): learned edges
    and explained prompts. Without it the release holds the SAE alone."""
    store: str = ""
    """Activation store holding the SAE's hook (held-out text is best): the features are scanned
    over it."""
    out: str = ""
    """Release directory (built in OUT.partial, renamed to OUT when complete)."""
    stats: str = ""
    """Optional co-activation stats directory (`python -m graphs stats`): co-activation
    neighbours."""
    transition: str = ""
    """Optional transition directory (`python -m graphs transition`): cross-layer edges and
    paths."""
    model: str = ""
    """Model for logits, CE loss recovered and explanations (a model spec: smollm2-135m,
    tiny-<family>, a local HF directory, a .gguf, org/name; default: the SAE's)."""
    device: str = "auto"
    """Device of the model: cpu, cuda, cuda:N, or auto (cuda when there is one)."""
    dtype: ComputeDtype = "auto"
    """Compute dtype of the model: auto is float32 on CPU, bfloat16 on CUDA."""
    prompts: str = DEFAULT_PROMPTS
    """Prompts explained into circuit graphs (with --graph), separated by '|'."""
    tokens: int = 0
    """Store tokens to scan, the first ones in store order (0: all)."""
    batch_size: int = 2048
    """Tokens encoded per batch."""
    top_k: int = 10
    """Top activating contexts kept per feature."""
    quantiles: int = 5
    """Activation-quantile bands sampled per feature."""
    per_quantile: int = 2
    """Contexts sampled from each band."""
    reservoir: int = 40
    """Uniform reservoir of firing tokens per feature the quantile samples are drawn from."""
    context_left: int = 16
    """Tokens shown before the chosen token."""
    context_right: int = 4
    """Tokens shown after it."""
    bins: int = 40
    """Activation histogram bins (log-spaced)."""
    neighbours: int = 10
    """Graph / co-activation / cross-layer neighbours listed per feature."""
    logits: int = 10
    """Top and bottom logits listed per feature."""
    ce_tokens: int = 4096
    """Store tokens re-run through the model with the SAE spliced in, for CE loss recovered
    (0: skip)."""
    license: str = "apache-2.0"
    """Licence of the release (SmolLM2 is Apache-2.0; the default corpus is public domain)."""
    seed: int = 0
    """Seed of the reservoir's hash (a different seed samples other quantile contexts)."""
    checkpoint_every: int = 8
    """Batches between checkpoints of the streamed passes."""


def identity(cfg: ExportConfig) -> dict:
    """What must match for a re-run to resume an unfinished export."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("out", "checkpoint_every")}


def export_release(cfg: ExportConfig, model: LoadedModel | None = None) -> Path:
    """Build (or finish) the release at cfg.out; returns its path. Safe to kill and re-run.

    `model`: an already loaded model to reuse (default: load cfg.model when a stage needs it)."""
    final = Path(cfg.out)
    if not cfg.out:
        raise ValueError("pass --out DIR for the release")
    if (final / RELEASE_JSON).exists():
        config = json.loads((final / RELEASE_JSON).read_text())["config"]
        _check_same(final, config, identity(cfg), "is a finished release")
        print(f"{final} is already a finished release of these inputs; nothing to do")
        return final
    if final.exists():
        raise ValueError(
            f"{final} exists and is not a finished release; pick a new --out or delete it"
        )
    staging = final.with_name(final.name + ".partial")
    inputs = check_inputs(cfg)  # every input checked before anything is written
    progress = _open_progress(staging, identity(cfg))
    builder = Builder(cfg, inputs, staging, log=lambda entry: _log(staging, entry), model=model)
    for stage in STAGES:
        if stage in progress["done"]:
            continue
        started = time.perf_counter()
        getattr(builder, stage)()
        progress["done"].append(stage)
        atomic_write_json(staging / PROGRESS, progress)
        seconds = round(time.perf_counter() - started, 2)
        _log(staging, {"stage": stage, "done": True, "seconds": seconds})
    meta = {**builder.release_meta(), "config": identity(cfg), "complete": True}
    atomic_write_json(staging / RELEASE_JSON, meta)
    shutil.rmtree(staging / "work", ignore_errors=True)
    (staging / PROGRESS).unlink()
    staging.rename(final)  # atomic: OUT appears whole or not at all
    return final


def _holds_files(staging: Path) -> bool:
    """Whether staging holds a file other than sae.atomic's temp files (a kill mid-write leaves
    .<name>.tmp behind)."""
    return any(
        not path.is_dir() and not (path.name.startswith(".") and path.name.endswith(".tmp"))
        for path in staging.rglob("*")
    )


def _open_progress(staging: Path, wanted: dict) -> dict:
    if (staging / PROGRESS).exists():
        progress = json.loads((staging / PROGRESS).read_text())
        _check_same(staging, progress["config"], wanted, "holds an unfinished export")
        return progress
    if staging.exists() and _holds_files(staging):
        raise ValueError(f"{staging} exists but holds no {PROGRESS}; delete it and re-run")
    if staging.exists():  # an export killed before its first progress file: nothing to resume
        print(f"{staging} holds nothing to resume yet; starting from scratch", file=sys.stderr)
    (staging / "work").mkdir(parents=True, exist_ok=True)
    progress = {"format_version": FORMAT_VERSION, "config": wanted, "done": []}
    atomic_write_json(staging / PROGRESS, progress)
    return progress


def _check_same(directory: Path, old: dict, new: dict, what: str) -> None:
    diffs = [
        f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    if diffs:
        raise ValueError(
            f"{directory} {what} made with other arguments ({'; '.join(diffs)}); re-run with the "
            "original arguments, or pick a new --out"
        )


def _log(staging: Path, entry: dict) -> None:
    with open(staging / LOG, "a") as f:
        f.write(json.dumps(entry) + "\n")
