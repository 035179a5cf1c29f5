from __future__ import annotations

import json
from pathlib import Path

import pytest

from sae.corpus import load_corpus


def test_builtin_corpus_has_all_sources_and_a_disjoint_heldout_split() -> None:
    everything = load_corpus("default", split="all")
    train = load_corpus("default", split="train")
    heldout = load_corpus("default", split="heldout")
    assert set(everything["source"]) == {"shakespeare", "milton", "kjv"}
    assert set(train["doc_id"]).isdisjoint(heldout["doc_id"])
    assert len(train) + len(heldout) == len(everything)
    assert 0.05 < len(heldout) / len(everything) < 0.15
    assert sum(len(t) for t in everything["text"]) > 8_000_000  # ~10 MB of real English
    genesis = everything.filter(lambda r: r["title"] == "Genesis 1")[0]["text"]
    assert genesis.startswith("In the beginning God created") and "1:1" not in genesis


def test_single_builtin_source() -> None:
    milton = load_corpus("milton", split="all")
    assert set(milton["source"]) == {"milton"} and len(milton) == 4


def test_user_text_directory(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.txt").write_text("second document")
    docs = load_corpus(str(tmp_path), split="all")
    assert docs.column_names == ["doc_id", "source", "title", "text"]
    assert sorted(docs["text"]) == ["first document", "second document"]


def test_user_jsonl_without_text_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="no 'text' column"):
        load_corpus(str(path))


def test_unknown_corpus_name_is_refused() -> None:
    with pytest.raises(FileNotFoundError, match="neither a built-in corpus"):
        load_corpus("no-such-corpus")
