"""The first-letter task's data (graphs.eval.letters.data): store rows, letters picked."""

from __future__ import annotations

import pytest
import torch

from graphs.eval.letters import (
    letter_task_data,
    pick_letters,
)
from graphs.first_letter import first_letter_labels
from tests.graphs.eval.letters.conftest import (
    HOOK,
)


def test_pick_letters_by_frequency() -> None:
    labels = torch.tensor([3] * 80 + [1] * 120 + [7] * 49 + [-1] * 500)
    assert pick_letters(labels) == [1, 3]
    with pytest.raises(ValueError, match="more tokens"):
        pick_letters(torch.tensor([2] * 10))


def test_letter_task_data_reads_only_labelled_rows(tiny, tiny_store) -> None:
    token_ids = torch.cat(
        [tiny_store.shard(s)["token_ids"].long() for s in range(len(tiny_store.manifest.shards))]
    )
    labelled = (first_letter_labels(token_ids, tiny.tokenizer) >= 0).nonzero().squeeze(1)
    assert 0 < len(labelled) < len(token_ids)
    full = letter_task_data(tiny_store, HOOK, tiny.tokenizer, max_per_token=None)
    assert len(full.labels) == len(labelled)
    assert torch.equal(full.token_ids, token_ids[labelled])
    assert torch.equal(full.x, tiny_store.rows(labelled, [HOOK])[HOOK])
    assert (full.labels >= 0).all()

    small = letter_task_data(tiny_store, HOOK, tiny.tokenizer, max_tokens=150, max_per_token=5)
    again = letter_task_data(tiny_store, HOOK, tiny.tokenizer, max_tokens=150, max_per_token=5)
    other = letter_task_data(
        tiny_store, HOOK, tiny.tokenizer, max_tokens=150, max_per_token=5, seed=1
    )
    assert small.x.shape == (150, tiny.d_model) and small.x.dtype == torch.float32
    assert torch.equal(small.x, again.x) and torch.equal(small.token_ids, again.token_ids)
    assert not torch.equal(small.token_ids, other.token_ids)
    assert int(torch.bincount(small.token_ids).max()) <= 5
    assert torch.equal(small.labels, first_letter_labels(small.token_ids, tiny.tokenizer))
    with pytest.raises(ValueError, match="no hook"):
        letter_task_data(tiny_store, "blocks.9.hook_resid_post", tiny.tokenizer)
