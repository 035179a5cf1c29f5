"""The first-letter task's data: a store's word tokens with their letter; which letters to score.

Every activation-store row keeps its token id, so labels come from the tokenizer alone
(`graphs.first_letter`). `letter_task_data` keeps at most `max_per_token` occurrences of each token
id, or frequent words ("the" for t) would make a letter's task a token-identity task.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from graphs.first_letter import LETTERS, first_letter_labels
from sae.store import ActivationStore

MIN_POSITIVES = 50  # letters=None keeps letters with at least this many positive tokens ...
MAX_LETTERS = 10  # ... at most this many, the most frequent first
MIN_TYPES = 4  # ... and, when splitting by token id, at least this many distinct positive tokens


class LetterTaskData(NamedTuple):
    x: Tensor  # [N, d_model] float32 raw activations
    labels: Tensor  # [N] int64 in 0..25
    token_ids: Tensor | None = None  # [N] int64; when given, splits hold out whole token ids


def letter_task_data(
    store: ActivationStore,
    hook: str,
    tokenizer,
    max_tokens: int = 100_000,
    seed: int = 0,
    max_per_token: int | None = 32,
    chunk: int = 16_384,
) -> LetterTaskData:
    """The store's letter-labelled rows: a seeded subsample, in store order, x in float32."""
    if hook not in store.hooks:
        raise ValueError(f"{store.directory} has no hook {hook!r}; pass one of {store.hooks}")
    # token ids read alone, so no activation is touched before the subsample is known
    # [n_rows]
    token_ids = torch.cat(
        [store.shard(s)["token_ids"].long() for s in range(len(store.manifest.shards))]
    )
    labels = first_letter_labels(token_ids, tokenizer)
    rows = (labels >= 0).nonzero().squeeze(1)
    if len(rows) == 0:
        raise ValueError(f"{store.directory} has no token that is a word of letters: harvest text")
    g = torch.Generator().manual_seed(seed)
    rows = rows[torch.randperm(len(rows), generator=g)]  # random order: the caps keep a random set
    if max_per_token is not None:
        rows = rows[_rank_in_group(token_ids[rows]) < max_per_token]
    rows = rows[:max_tokens].sort().values  # [N], sorted so shard reads stay sequential
    bar = tqdm(range(0, len(rows), chunk), desc="letter rows", leave=False)
    x = torch.cat([store.rows(rows[i : i + chunk], [hook])[hook] for i in bar])  # [N, d_model]
    return LetterTaskData(x, labels[rows], token_ids[rows])


def _rank_in_group(groups: Tensor) -> Tensor:
    """[n] how many earlier rows share each row's group (0 for a group's first row)."""
    n = len(groups)
    order = torch.argsort(groups, stable=True)
    sorted_groups = groups[order]
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    first_of_group = torch.arange(n)[starts][starts.cumsum(0) - 1]  # [n] start of each row's run
    rank = torch.empty(n, dtype=torch.int64)
    rank[order] = torch.arange(n) - first_of_group
    return rank


def pick_letters(labels: Tensor, groups: Tensor | None = None) -> list[int]:
    """Letters with MIN_POSITIVES+ tokens (and MIN_TYPES+ token ids), most frequent first, at most
    MAX_LETTERS of them."""
    counts = torch.bincount(labels[labels >= 0], minlength=len(LETTERS))  # [26]
    order = torch.sort(counts, descending=True, stable=True).indices.tolist()
    picked = [L for L in order if counts[L] >= MIN_POSITIVES]
    if groups is not None:
        picked = [L for L in picked if len(groups[labels == L].unique()) >= MIN_TYPES]
    if not picked:
        counted = dict(zip(LETTERS, counts.tolist(), strict=True))
        raise ValueError(
            f"no letter has {MIN_POSITIVES}+ labelled tokens ({counted}): use more tokens "
            "(letter_task_data max_tokens) or pass letters explicitly"
        )
    return picked[:MAX_LETTERS]
