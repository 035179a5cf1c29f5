"""Files that appear whole: write a temp file beside the target, fsync it, rename it over the
target.

A process killed at any moment leaves either the old file or the new one, never half of one; the
rename is atomic on POSIX file systems when the temp file sits in the same directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` to fill a temp file, fsync it, then rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(payload))


def atomic_write_json(path: str | Path, value: object) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=2).encode())


def atomic_save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """safetensors file of CPU-contiguous copies of `tensors`, written atomically."""
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))
