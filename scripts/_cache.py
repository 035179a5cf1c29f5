"""Caches of the quality scripts, keyed by the configuration that produced them.

A cached artefact (a trained SAE, codes, an evaluation) is reused only when everything that made
it is the same: its path carries a hash of that configuration (`keyed`), and beside it lies
`produced_by.json` with the configuration itself and the command line that actually ran. A
report prints those recorded commands (`commands`), not the command of the run that merely
reused the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RECORD = "produced_by.json"


def config_hash(config: Any) -> str:
    """12 hex digits of the sha256 of `config` as canonical JSON (dataclasses as their fields,
    paths and other objects as their str)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def content_digest(path: Path | str) -> str:
    """12 hex digits identifying what lies at `path`: an activation store by its manifest (which
    holds every shard's sha256), anything else by the bytes of its safetensors files. A key that
    names an input by path alone would survive that input being rebuilt in place."""
    path = Path(path)
    digest = hashlib.sha256()
    if (path / "manifest.json").exists():
        digest.update((path / "manifest.json").read_bytes())
    else:
        files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path} holds no safetensors file and no manifest.json")
        for file in files:
            digest.update(str(file.relative_to(path) if file != path else file.name).encode())
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()[:12]


def current_command() -> str:
    """The command line of this process, quoted so it can be pasted back into a shell."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def keyed(root: Path | str, name: str, config: Any) -> Path:
    """`root/name-<hash of config>`: where the artefact made from `config` lives. The path does not
    exist yet when nothing was made from this configuration."""
    return Path(root) / f"{name}-{config_hash(config)}"


def record(path: Path, config: Any) -> None:
    """Write `produced_by.json` into the directory `path` (or beside the file `path`): the
    configuration and the command that produced it. Call it once the artefact is complete."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    target = _record_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    body = {"command": current_command(), "config": config}
    target.write_text(json.dumps(body, indent=2, default=str))


def produced_by(path: Path) -> str:
    """The command recorded for the artefact at `path` ("unknown" for an artefact made before
    records were kept)."""
    target = _record_path(path)
    if not target.exists():
        return "unknown (made before commands were recorded)"
    return json.loads(target.read_text())["command"]


def cached_json(root: Path | str, name: str, config: Any, compute: Callable[[], Any]) -> Any:
    """The JSON value `compute()` returns for `config`, computed once and kept under `root`
    (`name-<hash>.json`, with its own record). The value comes back with the recorded command
    under "_command" when it is a dict."""
    path = keyed(root, name, config).with_suffix(".json")
    if not path.exists():
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, indent=2))
        tmp.replace(path)  # atomic: a killed run never leaves half a result behind
        record(path, config)
    value = json.loads(path.read_text())
    if isinstance(value, dict):
        value["_command"] = produced_by(path)
    return value


def commands(paths: list[Path]) -> list[str]:
    """The distinct commands that produced the artefacts at `paths`, in first-seen order."""
    seen: dict[str, None] = {}
    for path in paths:
        seen.setdefault(produced_by(path), None)
    return list(seen)


def commands_block(paths: list[Path]) -> list[str]:
    """Markdown lines: the command(s) that produced the results at `paths`."""
    found = commands(paths)
    lead = "Produced by:" if len(found) == 1 else "Produced by these commands (cached parts):"
    return [lead, "", "```bash", *found, "```"]


def _record_path(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        return path / RECORD
    return path.with_name(path.name + "." + RECORD)  # a file: its record sits beside it
