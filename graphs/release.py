"""Feature-dataset release: `python -m graphs export` and `load_release`.

A release directory (format_version 1):

    release.json              metric card, config, histogram edges, counts; "complete": true
    README.md                 dataset card (YAML configs for the three tables + the metric card)
    data/features.parquet     one row per feature       } a datasets.DatasetDict, columns in
    data/examples.parquet     one row per context       } graphs.release_tables
    data/edges.parquet        one row per edge          }
    saelens/<hook>/           the SAE in SAELens's layout (sae.io.export_saelens)
    neuronpedia/<i>.json      Neuronpedia-style feature JSON
    circuits/<slug>.json      circuit-tracer-style graph JSON of each explained prompt
    training/*.jsonl          the SAE's (and graph's) training metrics, when they were found
    dashboard/                the offline HTML site (graphs.dashboard)
    export_log.jsonl          every checkpoint and finished stage, once each

Atomic and resumable: everything is written under OUT.partial/ (scratch state in OUT.partial/work/)
and the directory is renamed to OUT only when every stage is done, so OUT exists only complete.
OUT.partial/progress.json lists the finished stages and what the export was asked to do; a re-run
with the same arguments skips finished stages and resumes the streamed passes at their last
checkpoint; a re-run with other arguments is refused before anything is touched.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import pyarrow.parquet as pq

from graphs.release_build import STAGES, Builder, check_inputs

FORMAT_VERSION = 1
RELEASE_JSON, PROGRESS, LOG = "release.json", "progress.json", "export_log.jsonl"
TABLES = ("features", "examples", "edges")
DEFAULT_PROMPTS = "And God said, Let there be light: and there was light.|To be, or not to be, that is the question"


@dataclass
class ExportConfig:
    sae: str = ""
    """SAE directory (cfg.json + sae.safetensors) whose features are released."""
    graph: str = ""
    """Graph autoencoder directory trained from that SAE (`python -m graphs train`): edges and explanations."""
    store: str = ""
    """Activation store holding the SAE's hook (held-out text is best): the features are scanned over it."""
    out: str = ""
    """Release directory (built in OUT.partial, renamed to OUT when complete)."""
    stats: str = ""
    """Optional co-activation stats directory (`python -m graphs stats`): co-activation neighbours."""
    transition: str = ""
    """Optional transition directory (`python -m graphs transition`): cross-layer edges and paths."""
    model: str = ""
    """Model for logits, CE loss recovered and explanations (tiny, smollm2-135m; default: the SAE's)."""
    prompts: str = DEFAULT_PROMPTS
    """Prompts explained into circuit graphs, separated by '|'."""
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
    """Store tokens re-run through the model with the SAE spliced in, for CE loss recovered (0: skip)."""
    license: str = "apache-2.0"
    """Licence of the release (SmolLM2 is Apache-2.0; the default corpus is public domain)."""
    seed: int = 0
    """Seed of the reservoir's hash (a different seed samples other quantile contexts)."""
    checkpoint_every: int = 8
    """Batches between checkpoints of the streamed passes."""


def identity(cfg: ExportConfig) -> dict:
    """What must match for a re-run to resume an unfinished export."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("out", "checkpoint_every")}


def export_release(cfg: ExportConfig, model=None) -> Path:
    """Build (or finish) the release at cfg.out; returns its path. Safe to kill and re-run.

    `model`: an already loaded `sae.models.LoadedModel` to reuse (default: load cfg.model)."""
    final = Path(cfg.out)
    if not cfg.out:
        raise ValueError("pass --out DIR for the release")
    if (final / RELEASE_JSON).exists():
        _check_same(
            final,
            json.loads((final / RELEASE_JSON).read_text())["config"],
            identity(cfg),
            "is a finished release",
        )
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
        _write_json(staging / PROGRESS, progress)
        _log(
            staging,
            {"stage": stage, "done": True, "seconds": round(time.perf_counter() - started, 2)},
        )
    _write_json(
        staging / RELEASE_JSON,
        {**builder.release_meta(), "config": identity(cfg), "complete": True},
    )
    shutil.rmtree(staging / "work", ignore_errors=True)
    (staging / PROGRESS).unlink()
    staging.rename(final)  # atomic: OUT appears whole or not at all
    return final


def _open_progress(staging: Path, wanted: dict) -> dict:
    if (staging / PROGRESS).exists():
        progress = json.loads((staging / PROGRESS).read_text())
        _check_same(staging, progress["config"], wanted, "holds an unfinished export")
        return progress
    if staging.exists():
        raise ValueError(f"{staging} exists but holds no {PROGRESS}; delete it and re-run")
    (staging / "work").mkdir(parents=True)
    progress = {"format_version": FORMAT_VERSION, "config": wanted, "done": []}
    _write_json(staging / PROGRESS, progress)
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


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def _log(staging: Path, entry: dict) -> None:
    with open(staging / LOG, "a") as f:
        f.write(json.dumps(entry) + "\n")


# ---------------------------------------------------------------------------- loading


@dataclass
class Release:
    """A loaded release: its tables, metric card and the paths of everything else."""

    path: Path
    meta: dict  # release.json
    data: datasets.DatasetDict  # features, examples, edges
    readme: str

    @property
    def card(self) -> dict:
        return self.meta["card"]

    @property
    def dashboard(self) -> Path:
        return self.path / "dashboard" / "index.html"

    def sae(self):
        """The released SAE, read back from its SAELens export."""
        from sae.io import import_saelens

        return import_saelens(self.path / "saelens" / self.card["hook"])

    def neuronpedia(self, feature: int) -> dict:
        return json.loads((self.path / "neuronpedia" / f"{feature}.json").read_text())

    def circuits(self) -> dict[str, dict]:
        return {
            p.stem: json.loads(p.read_text())
            for p in sorted((self.path / "circuits").glob("*.json"))
        }

    def examples_of(self, feature: int) -> datasets.Dataset:
        """The feature's contexts (examples are stored feature-major; offsets in release.json)."""
        start, end = (
            self.meta["example_offsets"][feature],
            self.meta["example_offsets"][feature + 1],
        )
        return self.data["examples"].select(range(start, end))


def load_release(path: str | Path, require_complete: bool = True) -> Release:
    """Load a release written by `python -m graphs export` (refuses an unfinished one)."""
    path = Path(path)
    meta_path = path / RELEASE_JSON
    if require_complete and (not meta_path.exists() or path.name.endswith(".partial")):
        hint = (
            " (an export still in progress or killed: re-run it with the same arguments to finish)"
            if (path / PROGRESS).exists() or path.name.endswith(".partial")
            else ""
        )
        raise FileNotFoundError(
            f"{path} is not a finished greylens release: no {RELEASE_JSON}{hint}"
        )
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if require_complete and (
        meta.get("format_version") != FORMAT_VERSION or not meta.get("complete")
    ):
        raise ValueError(
            f"{meta_path} has format_version {meta.get('format_version')} / complete "
            f"{meta.get('complete')}; this greylens reads complete releases of version {FORMAT_VERSION}"
        )
    tables = {
        name: datasets.Dataset(
            datasets.table.InMemoryTable(pq.read_table(path / "data" / f"{name}.parquet"))
        )
        for name in TABLES
    }
    readme = (path / "README.md").read_text() if (path / "README.md").exists() else ""
    return Release(path, meta, datasets.DatasetDict(tables), readme)
