"""Jane Austen's six novels from Debian `r-cran-janeaustenr`: one document per chapter.

The package keeps the novels in an R lazy-load database (``data/Rdata.rdx`` + ``Rdata.rdb``): the
.rdx is a compressed, R-serialized index ``variables -> (offset, length)`` into the .rdb, and each
.rdb entry is a 4-byte big-endian length followed by the compressed serialization of one object
(here a character vector of the novel's lines). The R serialization is parsed with PyPI `rdata`.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import warnings
import zlib
from pathlib import Path
from typing import Any

from zoo.data.document import Document
from zoo.data.fetch import SourceUnavailable, debian_package

NAME = "austen"
VERSION = 1  # bump when the cleaning changes: it names the cached JSON lines
PACKAGE = "r-cran-janeaustenr"
DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")

_CHAPTER = re.compile(r"^\s*chapter\s+([0-9]+|[ivxlc]+)\.?\s*$", re.IGNORECASE)
_VOLUME = re.compile(r"^\s*volume\s+([0-9]+|[ivx]+|one|two|three)\.?\s*$", re.IGNORECASE)
_END = re.compile(r"^\s*(the end|finis|a note on the text)\.?\s*$", re.IGNORECASE)
_EDITORIAL = re.compile(r"^\s*\[.*edition", re.IGNORECASE)  # "[End volume one of this edition."
_SEPARATOR = re.compile(r"^[\s*]+$")  # "* * * * *" scene breaks
_EMPHASIS = re.compile(r"_([^_\n]+)_")
_SPACES = re.compile(r"\s+")


def _decompress_entry(blob: bytes) -> bytes:
    """One lazy-load entry: 4-byte big-endian length, then zlib data (or a type byte Z/2/0 + data)."""
    size, kind, body = int.from_bytes(blob[:4], "big"), blob[4:5], blob[5:]
    if kind == b"Z":
        out = lzma.decompress(body)
    elif kind == b"2":
        out = bz2.decompress(body)
    elif kind == b"0":
        out = body
    else:
        out = zlib.decompress(blob[4:])
    if len(out) != size:
        raise ValueError(f"corrupt R lazy-load entry: expected {size} bytes, got {len(out)}")
    return out


def _unserialize(data: bytes) -> Any:
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS": entries have no file magic
        return rdata.conversion.convert(rdata.parser.parse_data(data))


def read_lazyload_db(rdx: str | Path, rdb: str | Path) -> dict[str, Any]:
    """All objects of an R lazy-load database, by name, converted to Python."""
    raw = Path(rdx).read_bytes()
    index = _unserialize(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else _decompress_entry(raw))
    blob = Path(rdb).read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        out[str(name)] = _unserialize(_decompress_entry(blob[int(offset) : int(offset) + int(length)]))
    return out


def paragraphs(lines: list[str]) -> str:
    """Wrapped lines -> paragraphs (a blank line ends one; runs of spaces become one), `_emphasis_` marks
    removed."""
    paras, current = [], []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paras.append(_SPACES.sub(" ", " ".join(current)))
            current = []
    text = "\n\n".join(paras)
    return _EMPHASIS.sub(r"\1", text).replace("_", "")


def chapters(lines: list[str]) -> list[str]:
    """A novel's lines -> the text of each chapter (title page, headings, scene-break stars,
    bracketed editorial notes and end matter dropped)."""
    found: list[list[str]] = []
    in_note = False
    for line in lines:
        if in_note or _EDITORIAL.match(line):  # "[End volume one of this edition. ... Press]"
            in_note = "]" not in line
        elif _CHAPTER.match(line):
            found.append([])
        elif not found:
            continue  # title page and preface before the first chapter
        elif _END.match(line):
            break
        elif not (_VOLUME.match(line) or _SEPARATOR.match(line)):
            found[-1].append(line)
    return [text for text in (paragraphs(chapter) for chapter in found) if text]


def documents_from_novels(novels: dict[str, Any]) -> list[Document]:
    order = [n for n in NOVELS if n in novels] + sorted(n for n in novels if n not in NOVELS)
    docs = []
    for novel in order:
        lines = ["" if line is None else str(line) for line in novels[novel]]
        for i, text in enumerate(chapters(lines), start=1):
            docs.append(Document(NAME, f"{novel}/{i:02d}", text))
    return docs


def load() -> list[Document]:
    package = debian_package(PACKAGE, NAME)
    rdx, rdb = package / DATA_DIR / "Rdata.rdx", package / DATA_DIR / "Rdata.rdb"
    if not (rdx.is_file() and rdb.is_file()):
        raise SourceUnavailable(f"source {NAME!r}: {rdx} or {rdb} is missing; delete {package} to refetch")
    try:
        import rdata  # noqa: F401
    except ImportError as e:
        raise SourceUnavailable(f"source {NAME!r} needs the `rdata` package: pip install rdata") from e
    return documents_from_novels(read_lazyload_db(rdx, rdb))
