"""What the side-venv training drivers share (_saelens_train.py, _sparsify_train.py).

They run in other venvs, where greylens is not installed, and import this file from beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch


def redirect_stdout() -> None:
    """Keep the real stdout for the one JSON line; everything else (library prints) goes to
    stderr."""
    global _JSON_OUT
    _JSON_OUT = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def emit(report: dict) -> None:
    print(json.dumps(report), file=_JSON_OUT, flush=True)


def common_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--train", type=Path, required=True, help='safetensors with "x": [rows, d] float32'
    )
    p.add_argument(
        "--eval", type=Path, required=True, help="the same, reconstructed after training"
    )
    p.add_argument("--n-latents", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--tokens", type=int, required=True, help="rounded down to whole batches")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    return p


def training_rows(args: argparse.Namespace) -> tuple[torch.Tensor, int]:
    """The training rows [n, d] float32 and the number of whole batches to train for."""
    from safetensors.torch import load_file

    steps = args.tokens // args.batch
    if steps < 1:
        raise SystemExit(f"--tokens {args.tokens} is less than one batch of {args.batch}")
    return load_file(args.train)["x"].float(), steps


def batches(x: torch.Tensor, batch: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """`steps` batches of rows of x in one seeded shuffled order, repeated as often as needed."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    order = order.repeat(-(-steps * batch // len(x)))
    for step in range(steps):
        yield x[order[step * batch : (step + 1) * batch]]


_JSON_OUT = sys.stdout
