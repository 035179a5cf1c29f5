"""What counts as a word and its first letter (graphs.first_letter): labels from the tokenizer."""

from __future__ import annotations

import torch

from graphs.first_letter import LETTERS, first_letter_labels


def test_first_letter_labels_on_tiny_tokenizer(tiny) -> None:
    tok = tiny.tokenizer
    ids = tok(" The quick, 123 jumps! I a Caesar's é", add_special_tokens=False)["input_ids"]
    texts = [tok.decode([i]) for i in ids]
    labels = first_letter_labels(torch.tensor(ids), tok).tolist()
    expected = {" quick": "q", " jumps": "j", " I": "i", " a": "a", " Caesar": "c"}
    for text, label in zip(texts, labels, strict=True):
        if text in expected:  # leading space stripped, case folded
            assert label == LETTERS.index(expected[text]), text
        elif not text.strip().isascii() or not text.strip().isalpha():
            assert label == -1, text  # ",", " ", digits, "!", "'s", the bytes of "é"
    assert sum(label >= 0 for label in labels) >= len(expected)
    assert all(label == -1 for text, label in zip(texts, labels, strict=True) if text in ",!'s123")
    assert first_letter_labels(torch.tensor([tok.bos_token_id]), tok).item() == -1
    assert first_letter_labels(torch.tensor(ids), tok, min_letters=2)[texts.index(" I")] == -1


class _RawTokenizer:
    """Decodes to the raw byte-BPE / SentencePiece form, markers and all."""

    all_special_ids = [0]
    vocab = ["<s>", "Ġthe", "▁Zebra", "ĠĠx", "Ġ", "Ġ1st", "apple", "Ġno-go", "\n\tWord"]

    def batch_decode(self, ids: list[list[int]], **_: object) -> list[str]:
        return [self.vocab[i[0]] for i in ids]


def test_first_letter_labels_strips_space_markers_and_keeps_shape() -> None:
    ids = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    labels = first_letter_labels(ids, _RawTokenizer())
    letter = LETTERS.index
    expected = [
        [-1, letter("t"), letter("z")],
        [letter("x"), -1, -1],
        [letter("a"), -1, letter("w")],
    ]
    assert labels.tolist() == expected
