"""One balanced train/test task per letter: "starts with L" against any other letter.

The same (seed, letter) gives the same split everywhere, so sparse probes, the dense probe and
absorption all see the same tokens. When token ids are known (`groups`), train and test split by
token id: the probes are scored on tokens they never saw, like Chanin et al.'s held-out
vocabulary (a mid-layer residual identifies the token itself, so a row-level split would reward
memorising token identities). Every split is class-balanced (the larger class subsampled), so
chance accuracy is 0.5.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from graphs.first_letter import LETTERS

MAX_PER_CLASS = 10_000  # per split and class: keeps an L-BFGS probe on 576 dims to seconds


class Split(NamedTuple):
    train: Tensor  # [n_train] row indices
    y_train: Tensor  # [n_train] bool: starts with the letter
    test: Tensor  # [n_test]
    y_test: Tensor  # [n_test]


def letter_split(
    labels: Tensor, letter: int, train_frac: float, seed: int, groups: Tensor | None
) -> Split:
    """The balanced task for one letter over labels [N] (-1: not a word)."""
    g = torch.Generator().manual_seed(seed * len(LETTERS) + letter)
    pos = (labels == letter).nonzero().squeeze(1)
    neg = ((labels >= 0) & (labels != letter)).nonzero().squeeze(1)
    pos_train, pos_test = _split_rows(pos, train_frac, g, groups, f"letter {LETTERS[letter]!r}")
    neg_train, neg_test = _split_rows(neg, train_frac, g, groups, f"not-{LETTERS[letter]!r}")
    return Split(*_balance(pos_train, neg_train, g), *_balance(pos_test, neg_test, g))


def _split_rows(
    rows: Tensor, train_frac: float, g: torch.Generator, groups: Tensor | None, what: str
) -> tuple[Tensor, Tensor]:
    units = rows if groups is None else groups[rows].unique()  # what gets assigned to a side
    if len(units) < 2:
        kind = "tokens" if groups is None else "distinct token ids"
        raise ValueError(f"{what} has {len(units)} {kind}, a split needs 2: drop it or add tokens")
    n_train = min(max(round(train_frac * len(units)), 1), len(units) - 1)
    train_units = units[torch.randperm(len(units), generator=g)[:n_train]]
    in_train = torch.isin(rows if groups is None else groups[rows], train_units)
    return rows[in_train], rows[~in_train]


def _balance(pos: Tensor, neg: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    n = min(len(pos), len(neg), MAX_PER_CLASS)
    pos = pos[torch.randperm(len(pos), generator=g)[:n]]
    neg = neg[torch.randperm(len(neg), generator=g)[:n]]
    y = torch.arange(2 * n) < n  # [2n] positives first
    return torch.cat([pos, neg]), y
