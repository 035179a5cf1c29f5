"""Balanced per-letter splits (graphs.eval.letters.splits)."""

from __future__ import annotations

from graphs.eval.letters.splits import letter_split
from tests.graphs.eval.letters.conftest import (
    letter_task,
)


def test_splits_are_balanced_and_hold_out_whole_tokens() -> None:
    data = letter_task()
    split = letter_split(data.labels, 2, 0.7, seed=0, groups=data.token_ids)
    for y in (split.y_train, split.y_test):
        assert int(y.sum()) == int((~y).sum()) > 0
    assert (data.labels[split.train] == 2).eq(split.y_train).all()
    shared = set(data.token_ids[split.train].tolist()) & set(data.token_ids[split.test].tolist())
    assert not shared
    row_split = letter_split(data.labels, 2, 0.7, seed=0, groups=None)
    assert set(data.token_ids[row_split.train].tolist()) & set(
        data.token_ids[row_split.test].tolist()
    )
