"""What the training drivers share (_saelens_train.py, _sparsify_train.py, bench_train.py).

The side drivers run in other venvs, where greylens is not installed, and import this file from
beside them; so this file imports nothing of greylens. `StepClock` is the one way all three
libraries are timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
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


class StepClock:
    """Times a training run identically for every library.

    `start()` right before the library's set-up (SAE and trainer construction), `tick()` at the
    end of every training step. Set-up time = start to the end of step 0 (construction plus the
    first step's one-off costs: allocation, lazy init, warm-up). Steady state = steps 1 .. N-2,
    each the time from one step's end to the next one's (data loading included): the last step is
    left out too, because a pull-based trainer (SAELens pulls batch k+1 right after step k ends)
    only shows the end of step N-2. `tick(untimed)` runs `untimed` after the step's end and
    starts the next interval after it (bench_train's interleaved GEMM probes).
    """

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.started = 0.0
        self.ends: list[float] = []  # the end of each step
        self.resumes: list[float] = []  # when the next step's interval starts

    def start(self) -> None:
        self.started = time.perf_counter()

    def tick(self, untimed: Callable[[], object] | None = None) -> None:
        self.ends.append(time.perf_counter())
        if untimed is not None:
            untimed()
        self.resumes.append(time.perf_counter())

    def pulls(self, data: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """`data`, ticking on every pull after the first: for a trainer that pulls a batch right
        after each step (SAELens's fit), pull k marks the end of step k-1."""
        for index, batch in enumerate(data):
            if index > 0:
                self.tick()
            yield batch

    def report(self, steps: int) -> dict:
        """setup_s, tok_per_s and median_step_s over steps 1 .. steps-2 (see the class)."""
        if steps < 3 or len(self.ends) < steps - 1:
            raise ValueError(
                f"{steps} steps with {len(self.ends)} step ends timed: a steady-state speed needs "
                "at least 3 steps (raise --tokens or lower --batch)"
            )
        durations = [self.ends[i] - self.resumes[i - 1] for i in range(1, steps - 1)]
        return {
            "setup_s": round(self.ends[0] - self.started, 3),
            "steady_steps": len(durations),
            "steady_s": round(sum(durations), 3),
            "tok_per_s": round(self.batch * len(durations) / sum(durations), 1),
            "median_step_s": statistics.median(durations),
        }


_JSON_OUT = sys.stdout
