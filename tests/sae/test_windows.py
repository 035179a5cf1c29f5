from __future__ import annotations

import datasets
import pytest

from sae.corpus import load_corpus
from sae.models import LoadedModel
from sae.windows import make_windows


def _docs(texts: list[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"doc_id": list(range(len(texts))), "text": texts})


def test_windows_start_with_bos_and_stay_inside_one_document(tiny: LoadedModel) -> None:
    docs = load_corpus("default", split="train")
    windows = make_windows(docs, tiny.tokenizer, context_size=32, seed=0, max_windows=200)
    assert windows.tokens.shape == (200, 32)
    assert (windows.tokens[:, 0] == tiny.bos_token_id).all()
    by_id = {row["doc_id"]: row["text"] for row in docs}
    for tokens, doc_id in zip(windows.tokens[:20], windows.doc_ids[:20], strict=True):
        doc = tiny.tokenizer(by_id[int(doc_id)], add_special_tokens=False).input_ids
        body = tokens[1:].tolist()
        starts = [
            i
            for i in range(0, len(doc) - len(body) + 1, len(body))
            if doc[i : i + len(body)] == body
        ]
        assert starts, "a window's tokens must be one aligned chunk of its own document"


def test_windows_are_deterministic_per_seed(tiny: LoadedModel) -> None:
    docs = load_corpus("default", split="train")
    a = make_windows(docs, tiny.tokenizer, 32, seed=1, max_windows=50)
    b = make_windows(docs, tiny.tokenizer, 32, seed=1, max_windows=50)
    c = make_windows(docs, tiny.tokenizer, 32, seed=2, max_windows=50)
    assert a.tokens.equal(b.tokens) and a.doc_ids.equal(b.doc_ids)
    assert not a.tokens.equal(c.tokens)


def test_empty_corpus_is_refused(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match="corpus is empty"):
        make_windows(_docs([]), tiny.tokenizer, 32, seed=0)


def test_documents_shorter_than_a_window_are_refused_with_advice(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match="lower --context-size"):
        make_windows(_docs(["short", "also short"]), tiny.tokenizer, 64, seed=0)
