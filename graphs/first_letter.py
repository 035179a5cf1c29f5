"""The first-letter task's one definition: which texts are words, and the word's first letter.

The label-free parents recipe (`graphs.parents`: which token types are words), the first-letter
evaluation (`graphs.eval.letters`: a letter per token) and the probes' `first_letter` task
(`probes.tasks`: words starting with "s") all label through `first_letter`, so they agree on what
a word is.

A text is a word when, with leading whitespace and the byte-BPE 'Ġ' / SentencePiece '▁' space
markers removed, it is at least `min_letters` ASCII letters and nothing else (as Chanin et al.'s
`get_alpha_tokens`; single letters such as " a" or " I" count). Special tokens never count.
"""

from __future__ import annotations

import re
import string

import torch
from torch import Tensor

LETTERS = string.ascii_lowercase
_LEADING = re.compile(r"^[\sĠ▁]+")  # whitespace and the byte-BPE / SentencePiece space markers


def first_letter(text: str, min_letters: int = 1) -> int:
    """0..25, the first letter of text (case-insensitive) if text is a word, else -1."""
    word = _LEADING.sub("", text)
    if len(word) < max(min_letters, 1) or not all(c in string.ascii_letters for c in word):
        return -1
    return ord(word[0].lower()) - ord("a")


def first_letter_labels(token_ids: Tensor, tokenizer, min_letters: int = 1) -> Tensor:
    """The first letter (0..25) of each token id, -1 unless the token is a word; same shape."""
    ids = torch.as_tensor(token_ids).long()
    unique, inverse = ids.unique(return_inverse=True)  # decode each distinct id once
    special = set(getattr(tokenizer, "all_special_ids", []))
    ids_list = unique.tolist()
    texts = tokenizer.batch_decode([[i] for i in ids_list], clean_up_tokenization_spaces=False)
    table = [
        -1 if i in special else first_letter(t, min_letters)
        for i, t in zip(ids_list, texts, strict=True)
    ]
    return torch.tensor(table, dtype=torch.int64)[inverse]
