"""Reading a finished release back: `load_release(path)` -> `Release`.

Loading needs only the release directory (its parquet tables and JSON); it imports neither the
export machinery nor the dashboard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow.parquet as pq

FORMAT_VERSION = 1
RELEASE_JSON, PROGRESS = "release.json", "progress.json"
TABLES = ("features", "examples", "edges")
# the card's feature_graph of a release made without --graph
NO_GRAPH = "none, the SAE alone (no learned edges, no explained prompts)"


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
    def has_graph(self) -> bool:
        """False for a release of a lone SAE: no learned edges, no explained prompts."""
        return self.meta.get("graph", True)  # releases before lone SAEs all had a graph

    @property
    def dashboard(self) -> Path:
        return self.path / "dashboard" / "index.html"

    def sae(self):
        """The released SAE, read back from its SAELens export."""
        from sae.io import import_saelens  # sae.io loads torch: only when the SAE is asked for

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
        offsets = self.meta["example_offsets"]
        return self.data["examples"].select(range(offsets[feature], offsets[feature + 1]))


def load_release(path: str | Path, require_complete: bool = True) -> Release:
    """Load a release written by `python -m graphs export` (refuses an unfinished one)."""
    path = Path(path)
    meta_path = path / RELEASE_JSON
    unfinished = path.name.endswith(".partial")
    if require_complete and (not meta_path.exists() or unfinished):
        hint = (
            " (an export still in progress or killed: re-run it with the same arguments to finish)"
            if (path / PROGRESS).exists() or unfinished
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
            f"{meta.get('complete')}; this greylens reads complete releases of version "
            f"{FORMAT_VERSION}"
        )
    tables = {
        name: datasets.Dataset(
            datasets.table.InMemoryTable(pq.read_table(path / "data" / f"{name}.parquet"))
        )
        for name in TABLES
    }
    readme = (path / "README.md").read_text() if (path / "README.md").exists() else ""
    return Release(path, meta, datasets.DatasetDict(tables), readme)
