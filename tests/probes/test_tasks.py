"""Probe tasks: shape, balance and group-disjoint splits of the four built-in tasks, their content,
the parquet cache, and loading + validating a user's own task file."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import datasets
import pytest

import probes.tasks as tasks
from probes.tasks import (
    AMBIGUOUS_LANGUAGES,
    DEFAULT_AGGREGATION,
    ROMANCE,
    TASKS,
    describe_task,
    load_task,
)

N = 60  # per class: small, so the whole file runs in seconds once the corpora are cached


@pytest.fixture(scope="module")
def built() -> dict[str, datasets.DatasetDict]:
    return {name: load_task(name, n_per_class=N) for name in TASKS}


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Built tasks go to tmp_path instead of the shared cache (corpora still come from it)."""
    monkeypatch.setattr(tasks, "_task_folder", lambda name, n, seed: tmp_path / f"{name}{n}-{seed}")
    return tmp_path


def _all_rows(task: datasets.DatasetDict) -> list[dict]:
    return [row for split in ("train", "test") for row in task[split]]


@pytest.mark.parametrize("name", TASKS)
def test_builtin_task_is_balanced_and_split_by_group(built: dict, name: str) -> None:
    task = built[name]
    assert set(task) == {"train", "test"}
    for split in task.values():
        assert split.column_names == ["text", "label", "group"]
        assert split.features["text"].dtype == "string"
        assert split.features["label"].dtype == "int64"
        assert split.features["group"].dtype == "string"
    rows = _all_rows(task)
    assert Counter(r["label"] for r in rows) == {0: N, 1: N}
    assert all(isinstance(r["text"], str) and r["text"].strip() for r in rows)
    assert set(task["train"]["group"]).isdisjoint(task["test"]["group"])
    for label in (0, 1):  # ~75/25 within each class, so the test split is balanced too
        in_test = sum(1 for y in task["test"]["label"] if y == label)
        assert 0.15 * N <= in_test <= 0.3 * N, (label, in_test)
    assert len({r["text"] for r in rows}) == len(rows)  # no example twice


def test_source_task_passages(built: dict) -> None:
    rows = _all_rows(built["source"])
    for r in rows:
        author = r["group"].split("/")[0]
        assert r["label"] == {"shakespeare": 0, "milton": 1}[author]
        assert 200 <= len(r["text"]) <= 500
        assert "gutenberg" not in r["text"].lower()
        letters = [c for c in r["text"] if c.isalpha()]
        assert sum(c.isupper() for c in letters) <= 0.5 * len(letters)
    milton = {r["group"].split("/")[1] for r in rows if r["label"] == 1}
    assert milton <= {
        "areopagitica",
        "lallegro_il_penseroso_comus_and_lycidas",
        "paradise_lost_(no_introduction)",
        "paradise_regained",
    }


def test_passages_cut_at_blank_lines_and_skip_boilerplate() -> None:
    # every block is 300-500 characters, so each one is exactly one chunk
    speech = "\n".join(f"Line {i} of a long speech, spoken slowly with feeling." for i in range(6))
    cast = "\n".join(f"KING {name.upper()} OF SOMEWHERE, A LORD." for name in "abcdefghijkl")
    licence = "This eBook is for the use of anyone anywhere. " * 3 + "Project Gutenberg License."
    document = "\n\n".join([cast, speech, licence + "\n" + licence, speech, "THE END"])
    passages = [p for _, p in tasks._prose_passages(document)]
    assert passages == [speech, speech]  # cast list, licence and the short tail are dropped
    chunks = tasks._chunks("\n".join(["x" * 90] * 30))
    assert all(len(c) <= 500 for c in chunks) and "".join(chunks).count("x") == 90 * 30


def test_code_filter_drops_docstring_chunks() -> None:
    docstring = '''    """Return the number of items.

    The count includes hidden items, but not the ones that were
    removed earlier; see the module notes for details.
    """'''
    code = """    def count(self):
        total = 0
        for item in self.items:
            total += item.size
        return total"""
    assert tasks._looks_like_code(code) and not tasks._looks_like_code(docstring)
    assert not tasks._looks_like_code("# a comment\n# another comment (with brackets)\nx = 1")


def _code_like(text: str) -> bool:
    return any(marker in text for marker in ("def ", "import ", "=", "return", "self."))


def test_code_task_separates_python_from_prose(built: dict) -> None:
    rows = _all_rows(built["code"])
    code = [r for r in rows if r["label"] == 1]
    prose = [r for r in rows if r["label"] == 0]
    assert all(r["group"].startswith("stdlib/") and r["group"].endswith(".py") for r in code)
    in_stdlib = [r for r in prose if r["group"].startswith("stdlib/")]  # docstrings: their module's
    assert in_stdlib and all(tasks._looks_like_prose(r["text"]) for r in in_stdlib)
    assert sum(_code_like(r["text"]) for r in code) >= 0.9 * len(code)
    # Old prose holds no code words; modern prose is Python's docs and may name them ("return").
    old = [r for r in prose if not r["group"].startswith(tasks.MODERN_GROUPS)]
    assert sum(_code_like(r["text"]) for r in old) <= 0.05 * len(old)
    assert sum("(" in r["text"] and ")" in r["text"] for r in code) >= 0.7 * len(code)


def test_language_task_labels_romance_languages(built: dict) -> None:
    for r in _all_rows(built["language"]):
        assert (r["group"] in ROMANCE) == (r["label"] == 1)
        assert r["group"] not in AMBIGUOUS_LANGUAGES and len(r["text"]) >= 40
    rows = tasks._language_rows()
    label_of = {text: (label, group) for text, label, group in rows}
    french = [t for t in label_of if "Considérant que la reconnaissance de la dignité" in t]
    german = [t for t in label_of if "Alle Menschen sind frei und gleich an Würde" in t]
    english = [t for t in label_of if "No one shall be held in slavery" in t]
    assert french and german and english
    assert label_of[french[0]] == (1, "fr")
    assert label_of[german[0]] == (0, "de")
    assert label_of[english[0]] == (0, "en")
    assert {group for _, _, group in rows} >= ROMANCE  # every listed code really has text


def test_language_description_counts_match_the_data() -> None:
    rows = tasks._language_rows()
    pieces = Counter(label for _, label, _ in rows)
    languages = Counter(label for label, _ in {(label, group) for _, label, group in rows})
    text = describe_task("language")
    assert f"{pieces[1]} pieces of the {languages[1]} Romance languages" in text
    assert f"{pieces[0]:,} pieces of {languages[0]} other languages" in text


def test_smaller_class_bounds_the_task_size() -> None:
    """There are fewer Romance pieces than 500: all of them are used, negatives match."""
    available = Counter(label for _, label, _ in tasks._language_rows())
    assert available[1] < 500 < available[0]
    counts = Counter(_all_rows_labels(load_task("language", n_per_class=500)))
    assert counts == {0: available[1], 1: available[1]}


def _all_rows_labels(task: datasets.DatasetDict) -> list[int]:
    return list(task["train"]["label"]) + list(task["test"]["label"])


def test_first_letter_task_is_single_words(built: dict) -> None:
    rows = _all_rows(built["first_letter"])
    for r in rows:
        word = r["text"].strip()
        assert r["text"] == " " + word and r["group"] == word
        assert word.isalpha() and word.islower() and 3 <= len(word) <= 12
        assert r["label"] == int(word.startswith("s"))
    assert len({r["text"][1] for r in rows if r["label"] == 0}) >= 8  # many other letters


def test_task_cache_is_written_once_then_reused(
    built: dict, private_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_task("first_letter", n_per_class=N)
    assert sorted(p.name for p in (private_cache / f"first_letter{N}-0").iterdir()) == [
        "test.parquet",
        "train.parquet",
    ]

    def must_not_rebuild() -> list:
        raise AssertionError("the cached task was rebuilt")

    monkeypatch.setitem(tasks._BUILDERS, "first_letter", must_not_rebuild)
    start = time.perf_counter()
    second = load_task("first_letter", n_per_class=N)
    assert time.perf_counter() - start < 2.0
    for split in ("train", "test"):
        assert second[split].to_dict() == first[split].to_dict()
        # the fresh build equals what the shared cache holds: builds are deterministic
        assert built["first_letter"][split].to_dict() == first[split].to_dict()
    assert not list(private_cache.glob(".*tmp*"))  # no temp folder left behind


def test_seed_changes_the_sample(private_cache: Path) -> None:
    a, b = load_task("first_letter", N, seed=0), load_task("first_letter", N, seed=1)
    assert set(a["train"]["text"]) != set(b["train"]["text"])


def test_too_few_examples_is_refused(private_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [(f"pos {i}", 1, f"p{i}") for i in range(10)]
    rows += [(f"neg {i}", 0, f"n{i}") for i in range(99)]
    monkeypatch.setitem(tasks._BUILDERS, "source", lambda: rows)
    with pytest.raises(ValueError, match="only 10 positives and 99 negatives"):
        load_task("source")
    with pytest.raises(ValueError, match="n_per_class=5 is too small"):
        load_task("code", n_per_class=5)


def test_unknown_task_lists_the_tasks() -> None:
    with pytest.raises(ValueError, match="source, code, language, first_letter"):
        load_task("sentiment")
    with pytest.raises(ValueError, match="unknown task"):
        describe_task("sentiment")


def test_descriptions_and_aggregation_cover_every_task() -> None:
    assert set(DEFAULT_AGGREGATION) == set(TASKS)
    assert set(DEFAULT_AGGREGATION.values()) <= {"mean", "max", "last"}
    for name in TASKS:
        text = describe_task(name)
        assert len(text) > 200 and "\n" not in text


# --------------------------------------------------------------------------- user task files


def _user_rows(n: int = 40) -> list[dict]:
    # 40 rows, 10 groups of 4 (two of each class), so a 75/25 split by group is possible
    return [{"text": f"example {i}", "label": i % 2, "group": f"g{i // 4}"} for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_user_jsonl_is_split_by_group(tmp_path: Path) -> None:
    task = load_task(str(_write_jsonl(tmp_path / "task.jsonl", _user_rows())))
    assert task["train"].column_names == ["text", "label", "group"]
    assert len(task["train"]) + len(task["test"]) == 40
    assert set(task["train"]["group"]).isdisjoint(task["test"]["group"])
    assert set(task["test"]["label"]) == {0, 1} and 6 <= len(task["test"]) <= 14


def test_user_split_column_and_other_formats(tmp_path: Path) -> None:
    rows = [dict(r, split="test" if i < 8 else "train") for i, r in enumerate(_user_rows())]
    task = load_task(str(_write_jsonl(tmp_path / "task.jsonl", rows)))
    assert task["test"]["text"] == [f"example {i}" for i in range(8)]
    datasets.Dataset.from_list(_user_rows()).to_csv(str(tmp_path / "task.csv"))
    assert sum(len(s) for s in load_task(str(tmp_path / "task.csv")).values()) == 40
    no_group = [{"text": r["text"], "label": r["label"]} for r in _user_rows()]
    datasets.Dataset.from_list(no_group).to_parquet(str(tmp_path / "task.parquet"))
    by_row = load_task(str(tmp_path / "task.parquet"))
    assert len(by_row["test"]) == 10  # split by row when there is no group
    saved = datasets.DatasetDict(
        train=datasets.Dataset.from_list(no_group[:30]),
        test=datasets.Dataset.from_list(no_group[30:]),
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    assert len(load_task(str(tmp_path / "saved"))["test"]) == 10


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: {"text": r["text"]}, "no 'label' column"),
        (lambda r: {"body": r["text"], "label": r["label"]}, "no 'text' column"),
        (lambda r: dict(r, label=1), "only label 1 is present"),
        (lambda r: dict(r, label=r["label"] * 2), "labels must be 0 or 1, found 2"),
        (lambda r: dict(r, label="yes"), "labels must be 0 or 1, found 'yes'"),
        (lambda r: dict(r, text=" " if r["text"] == "example 3" else r["text"]), "row 3 has an"),
        (lambda r: dict(r, split="dev"), "column 'split' must hold"),
    ],
)
def test_user_file_validation(tmp_path: Path, change, message: str) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [change(r) for r in _user_rows()])
    with pytest.raises(ValueError, match=message):
        load_task(str(path))


def test_user_file_with_too_few_groups_is_refused(tmp_path: Path) -> None:
    rows = [dict(r, group="a" if r["label"] else "b") for r in _user_rows()]
    with pytest.raises(ValueError, match="would lack a class"):
        load_task(str(_write_jsonl(tmp_path / "two_groups.jsonl", rows)))
    (tmp_path / "task.txt").write_text("hello")
    with pytest.raises(ValueError, match="can't read"):
        load_task(str(tmp_path / "task.txt"))
