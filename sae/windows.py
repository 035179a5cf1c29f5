"""Tokenization into fixed context windows: BOS + (context_size - 1) tokens of ONE document.

A window never spans two documents (the model never sees text from another document in its
context), and a document's tail shorter than a window is dropped. Documents are visited in a
seeded random order and tokenized only until enough windows exist (a small harvest need not
tokenize the whole corpus); those windows are then shuffled. The same (seed, max_windows) always
gives the same windows, which is what makes a resumed harvest identical to an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Windows:
    tokens: torch.Tensor  # [n_windows, context_size] int64, column 0 is BOS
    doc_ids: torch.Tensor  # [n_windows] int64

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def context_size(self) -> int:
        return self.tokens.shape[1]


def make_windows(
    docs: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    context_size: int,
    seed: int,
    max_windows: int | None = None,
) -> Windows:
    """Cut documents into BOS-prefixed windows, in a seeded order, and shuffle them with `seed`."""
    if len(docs) == 0:
        raise ValueError("the corpus is empty: no documents to tokenize")
    if context_size < 2:
        raise ValueError(f"context_size must be at least 2 (BOS + one token), got {context_size}")
    body = context_size - 1
    bos = tokenizer.bos_token_id
    generator = torch.Generator().manual_seed(seed)
    doc_order = torch.randperm(len(docs), generator=generator).tolist()
    chunks: list[torch.Tensor] = []
    owners: list[int] = []
    for start in range(0, len(docs), 64):  # batches keep the fast tokenizer busy without big RAM
        if max_windows is not None and len(owners) >= max_windows:
            break
        batch = docs.select(doc_order[start : start + 64])[:]
        encoded = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        for doc_id, ids in zip(batch["doc_id"], encoded, strict=True):
            n_full = len(ids) // body
            if n_full == 0:
                continue
            ids_t = torch.tensor(ids[: n_full * body], dtype=torch.int64).view(n_full, body)
            chunks.append(ids_t)
            owners.extend([doc_id] * n_full)
    if not chunks:
        raise ValueError(
            f"no document is at least {body} tokens long, so no window of context_size "
            f"{context_size} fits; lower --context-size or use longer documents"
        )
    bodies = torch.cat(chunks)  # [n_windows, body]
    tokens = torch.cat([torch.full((len(bodies), 1), bos, dtype=torch.int64), bodies], dim=1)
    order = torch.randperm(len(tokens), generator=generator)
    if max_windows is not None:
        order = order[:max_windows]
    return Windows(tokens[order], torch.tensor(owners, dtype=torch.int64)[order])
