"""The `code` task's negatives: half modern English (Python's documentation and the stdlib's
docstrings, prose passages only), half 17th-century prose; and the python-docs corpus behind it."""

from __future__ import annotations

import random
from collections import Counter

import pytest

import probes.tasks as tasks
from probes.tasks import MODERN_GROUPS, load_task
from sae.corpus import load_corpus

N = 40


@pytest.fixture(scope="module")
def code_task():
    return load_task("code", n_per_class=N)


def test_code_task_negatives_are_half_modern_english(code_task) -> None:
    for split in ("train", "test"):
        rows = [r for r in code_task[split] if r["label"] == 0]
        modern = [r for r in rows if r["group"].startswith(MODERN_GROUPS)]
        assert modern, f"no modern English negatives in {split}"
        assert len(rows) - len(modern) > 0, f"no 17th-century negatives in {split}"
    negatives = [r for s in ("train", "test") for r in code_task[s] if r["label"] == 0]
    modern = [r for r in negatives if r["group"].startswith(MODERN_GROUPS)]
    assert len(modern) == N // 2  # the strata share the negatives equally
    kinds = Counter(r["group"].split("/")[0] for r in modern)
    assert set(kinds) == {"stdlib", "python-docs"}, kinds  # docstrings and reference topics
    for r in modern:
        assert tasks._looks_like_prose(r["text"])
        assert ">>>" not in r["text"]


def test_docstrings_share_their_files_group_with_its_code(code_task) -> None:
    groups = {split: set(code_task[split]["group"]) for split in ("train", "test")}
    assert groups["train"].isdisjoint(groups["test"])
    docstring_groups = {
        r["group"] for s in ("train", "test") for r in code_task[s] if r["label"] == 0
    } & {r["group"] for s in ("train", "test") for r in code_task[s] if r["label"] == 1}
    assert all(g.startswith("stdlib/") for g in docstring_groups)


def test_prose_filter_keeps_sentences_and_drops_code_and_tables() -> None:
    prose = (
        "Return the number of items in the container. The result is\n"
        "cached, so calling it twice is cheap; see the notes below.\n"
    )
    sample = "Example:\n\n   >>> len([1, 2, 3])\n   3\n   x = {'a': 1}\n   print(x)\n"
    table = "+-------+-------+\n| name  | value |\n+=======+=======+\n| a     | 1     |\n"
    assert tasks._looks_like_prose(prose)
    assert not tasks._looks_like_prose(sample)
    assert not tasks._looks_like_prose(table)


def test_stratified_sample_shares_rows_between_strata() -> None:
    rows = [(f"a{i}", 0, f"a/{i}") for i in range(10)] + [(f"b{i}", 0, f"b/{i}") for i in range(3)]

    def stratum(row: tasks.Row) -> str:
        return row[2][0]

    for n, expected in ((4, {"a": 2, "b": 2}), (8, {"a": 5, "b": 3}), (13, {"a": 10, "b": 3})):
        chosen = tasks._stratified_sample(rows, n, random.Random(0), stratum)
        assert len(chosen) == n and len(set(chosen)) == n
        assert Counter(stratum(r) for r in chosen) == expected


def test_python_docs_corpus_is_modern_english_from_the_interpreter() -> None:
    docs = load_corpus("python-docs", split="all")
    titles = docs["title"]
    assert "topics/assert" in titles and "docstrings/os.py" in titles
    assert set(docs["source"]) == {"python-docs"}
    os_doc = docs[titles.index("docstrings/os.py")]["text"]
    assert "import" not in os_doc.splitlines()[0]  # docstrings, not the module's code
    assert "def " not in os_doc.split("\n\n")[0]
