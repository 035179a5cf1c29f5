"""Activation store: `manifest.json` + safetensors shards, written atomically, read zero-copy.

Layout of a store directory (format_version 1):

    manifest.json             what made the store and which shards are complete (StoreManifest)
    shard-00000.safetensors   {hook: [n, d_model], "token_ids": [n], "doc_ids": [n],
                               "positions": [n]}
    shard-00001.safetensors   ...

A shard is written to a temp file, fsynced and renamed; only then is it added to the manifest,
which is itself replaced atomically. A store killed at any moment therefore holds a prefix of
complete, checksummed shards, and a resumed harvest rewrites whatever came after that prefix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import datasets
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from sae.atomic import atomic_write_bytes
from sae.models import sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ROW_COLUMNS = ("token_ids", "doc_ids", "positions")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class StoreError(ValueError):
    """A store that can't be used as asked: mismatch, corruption, or an incompatible resume."""


@dataclass
class ShardInfo:
    file: str
    n_tokens: int
    sha256: str


@dataclass
class StoreManifest:
    model: str
    weights_sha256: str
    hooks: list[str]
    d_model: int
    dtype: str
    context_size: int
    corpus: str
    seed: int
    n_tokens_target: int
    windows_per_shard: int
    keep_bos: bool
    split: str = "train"  # stores written before this field existed were all train-split
    # LoadedModel.identity() of the model harvested ({} in stores written before it existed)
    model_record: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    shards: list[ShardInfo] = field(default_factory=list)
    complete: bool = False

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    def identity(self) -> dict:
        """Everything that must match for a resumed harvest to continue this store (the model
        record is checked apart, by sae.identity, so that old stores without one resume)."""
        skip = ("shards", "complete", "model_record")
        return {k: v for k, v in asdict(self).items() if k not in skip}

    @classmethod
    def load(cls, directory: Path) -> StoreManifest:
        path = Path(directory) / MANIFEST
        if not path.exists():
            raise StoreError(f"{directory} is not an activation store (no {MANIFEST})")
        raw = json.loads(path.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{path} has format_version {raw.get('format_version')}; this greylens reads "
                f"{FORMAT_VERSION}. Re-harvest, or use the greylens version that wrote it."
            )
        known = {f.name for f in fields(cls)}
        required = {
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        }
        if missing := sorted(required - raw.keys()):
            raise StoreError(
                f"{path} lacks {', '.join(missing)}; it is not a complete greylens manifest"
            )
        manifest = cls(**{k: v for k, v in raw.items() if k in known})
        manifest.shards = [ShardInfo(**s) for s in raw["shards"]]
        return manifest

    def save(self, directory: Path) -> None:
        atomic_write_bytes(Path(directory) / MANIFEST, json.dumps(asdict(self), indent=2).encode())


class StoreWriter:
    """Appends shards to a store; `open` resumes a store made with the same identity."""

    def __init__(self, directory: Path, manifest: StoreManifest) -> None:
        self.directory = Path(directory)
        self.manifest = manifest

    @classmethod
    def open(cls, directory: str | Path, manifest: StoreManifest) -> StoreWriter:
        directory = Path(directory)
        if (directory / MANIFEST).exists():
            existing = StoreManifest.load(directory)
            _check_same_identity(directory, existing.identity(), manifest.identity())
            for shard in existing.shards:  # a listed shard must still be there, whole
                if not (directory / shard.file).exists():
                    raise StoreError(
                        f"{directory / shard.file} is listed in the manifest but missing"
                    )
            return cls(directory, existing)
        if directory.exists() and any(directory.iterdir()):
            raise StoreError(
                f"{directory} exists, is not empty and is not a store; pick a new --out"
            )
        directory.mkdir(parents=True, exist_ok=True)
        manifest.save(directory)
        return cls(directory, manifest)

    @property
    def n_shards_done(self) -> int:
        return len(self.manifest.shards)

    def write_shard(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write the next shard (temp + fsync + rename), then record it in the manifest."""
        index = len(self.manifest.shards)
        name = f"shard-{index:05d}.safetensors"
        payload = save({k: v.contiguous() for k, v in tensors.items()})
        atomic_write_bytes(self.directory / name, payload)
        n_tokens = int(tensors["token_ids"].shape[0])
        self.manifest.shards.append(ShardInfo(name, n_tokens, hashlib.sha256(payload).hexdigest()))
        self.manifest.save(self.directory)

    def finish(self) -> None:
        self.manifest.complete = True
        self.manifest.save(self.directory)


def _check_same_identity(directory: Path, old: dict, new: dict) -> None:
    diffs = [
        f"{k}: store has {old[k]!r}, this run {new.get(k)!r}" for k in old if old[k] != new.get(k)
    ]
    if diffs:
        raise StoreError(
            f"{directory} was made by a different harvest ({'; '.join(diffs)}); "
            "re-run with the original arguments to resume it, or pick a new --out"
        )


class ActivationStore:
    """Reads a store: random access, seeded shuffled batches, and export to `datasets`.

    Shards are memory-mapped (safetensors), so reading rows copies only those rows. Each shard's
    sha256 is checked the first time it is opened (`verify=False` skips that).
    """

    def __init__(self, directory: str | Path, verify: bool = True) -> None:
        self.directory = Path(directory)
        self.manifest = StoreManifest.load(self.directory)
        self.verify_on_open = verify
        self._shards: dict[int, dict[str, torch.Tensor]] = {}
        sizes = [s.n_tokens for s in self.manifest.shards]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # [n_shards + 1]

    @property
    def hooks(self) -> list[str]:
        return self.manifest.hooks

    @property
    def d_model(self) -> int:
        return self.manifest.d_model

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def check_model(self, model_name: str, weights_sha256: str, d_model: int) -> None:
        """Raise if the store was harvested from another model than the one about to use it."""
        m = self.manifest
        if d_model != m.d_model:
            raise StoreError(f"{self.directory} holds d_model {m.d_model}, the model has {d_model}")
        if weights_sha256 != m.weights_sha256:
            raise StoreError(
                f"{self.directory} was harvested from {m.model} (weights sha256 "
                f"{m.weights_sha256[:12]}…), not from {model_name} ({weights_sha256[:12]}…)"
            )

    def shard(self, index: int) -> dict[str, torch.Tensor]:
        """All tensors of one shard, memory-mapped."""
        if index not in self._shards:
            info = self.manifest.shards[index]
            path = self.directory / info.file
            if self.verify_on_open:
                self._verify_shard(path, info)
            with safe_open(path, framework="pt") as f:
                self._shards[index] = {key: f.get_tensor(key) for key in f.keys()}
        return self._shards[index]

    @staticmethod
    def _verify_shard(path: Path, info: ShardInfo) -> None:
        if not path.exists():
            raise StoreError(f"shard {path} is missing")
        if sha256_file(path) != info.sha256:
            raise StoreError(
                f"shard {path} is corrupted: its sha256 does not match the manifest; "
                "delete it and its manifest entry onwards, then resume the harvest to rewrite it"
            )

    def verify(self) -> None:
        for info in self.manifest.shards:
            self._verify_shard(self.directory / info.file, info)

    def rows(
        self, index: torch.Tensor | list[int], hooks: list[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Rows by global index, in the order asked. Activations come back as float32."""
        index = torch.as_tensor(index, dtype=torch.int64)  # [n]
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row index out of range for a store of {len(self)} rows")
        keys = list(hooks or self.hooks) + list(ROW_COLUMNS)
        shard_of = torch.from_numpy(np.searchsorted(self._offsets, index.numpy(), side="right") - 1)
        out = {k: None for k in keys}
        for s in shard_of.unique().tolist():
            picked = (shard_of == s).nonzero().squeeze(1)  # positions in the output
            local = index[picked] - int(self._offsets[s])
            tensors = self.shard(s)
            for k in keys:
                if out[k] is None:
                    out[k] = torch.empty(
                        (len(index), *tensors[k].shape[1:]), dtype=tensors[k].dtype
                    )
                out[k][picked] = tensors[k][local]
        return {k: (v.float() if k not in ROW_COLUMNS else v) for k, v in out.items()}

    def epoch_order(self, seed: int, epoch: int = 0, buffer_shards: int = 4) -> torch.Tensor:
        """A seeded order of all rows: shards in random order, rows mixed within a buffer of shards.

        Pure function of (seed, epoch): a trainer that resumes at batch b of an epoch can rebuild
        exactly the same order and skip b batches without reading them.
        """
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        shard_order = torch.randperm(len(self.manifest.shards), generator=g).tolist()
        parts = []
        for i in range(0, len(shard_order), buffer_shards):
            buffer = torch.cat(
                [
                    torch.arange(self._offsets[s], self._offsets[s + 1])
                    for s in shard_order[i : i + buffer_shards]
                ]
            )
            parts.append(buffer[torch.randperm(len(buffer), generator=g)])
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def batches(
        self,
        batch_size: int,
        seed: int = 0,
        hooks: list[str] | None = None,
        epoch: int = 0,
        start_batch: int = 0,
        shuffle: bool = True,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of one epoch (the last one may be short), from batch `start_batch` on."""
        order = self.epoch_order(seed, epoch) if shuffle else torch.arange(len(self))
        for start in range(start_batch * batch_size, len(order), batch_size):
            yield self.rows(order[start : start + batch_size], hooks)

    def to_hf_dataset(self, hooks: list[str] | None = None) -> datasets.Dataset:
        """The store as a `datasets.Dataset`: one row per token, activations as float lists."""
        parts = []
        for s in range(len(self.manifest.shards)):
            tensors = self.shard(s)
            columns = {k: tensors[k].numpy() for k in ROW_COLUMNS}
            for hook in hooks or self.hooks:
                columns[hook] = list(tensors[hook].float().numpy())
            parts.append(datasets.Dataset.from_dict(columns))
        return datasets.concatenate_datasets(parts) if parts else datasets.Dataset.from_dict({})

    def summary(self) -> dict:
        m = self.manifest
        info = {k: v for k, v in asdict(m).items() if k != "shards"}
        info.update(n_shards=len(m.shards), n_tokens=m.n_tokens, path=str(self.directory.resolve()))
        info["bytes"] = sum((self.directory / s.file).stat().st_size for s in m.shards)
        return info
