"""The World English Bible from Debian `sword-text-web` (SWORD module engWEB2015eb): one document
per chapter, verses joined with spaces, all OSIS markup, footnotes and Strong's numbers removed.

The module also carries the deuterocanon; by default only the 66 books of the Protestant canon
(1,189 chapters) are used, so the corpus matches the usual "WEB" text.
"""

from __future__ import annotations

import functools
import html
import re
from pathlib import Path

from zoo.data.document import Document
from zoo.data.fetch import SourceUnavailable, debian_package

NAME = "bible"
VERSION = 1  # bump when the cleaning changes: it names the cached JSON lines
PACKAGE = "sword-text-web"
MODULE = "engWEB2015eb"
SWORD_DIR = "usr/share/sword"
DEUTEROCANON = frozenset(
    {
        "Tob",
        "Jdt",
        "EsthGr",
        "Wis",
        "Sir",
        "Bar",
        "PrAzar",
        "Sus",
        "Bel",
        "1Macc",
        "2Macc",
        "1Esd",
        "PrMan",
        "AddPs",
        "3Macc",
        "2Esd",
        "4Macc",
    }
)

_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.DOTALL)
_LABEL = re.compile(r"<(title|speaker)\b([^>]*)>(.*?)</\1>", re.DOTALL)
_GLOSSARY = re.compile(r"<div\b[^>]*\btype=\"glossary\"")
_BLOCK = re.compile(r"</?(?:l|lg|lb|div|p|list|item|chapter|milestone|verse|title|speaker)\b[^>]*>")
_TAG = re.compile(r"<[^>]*>")
_MARK = "\x00"  # where a footnote was: becomes a space when it sat between two words
_GLUED = re.compile(rf"(?<=[\w.,;:!?”’)\]]){_MARK}+(?=[\w“‘(\[])")
_SPACE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r" +(?=[,.;:!?”’)\]])")


def _label(match: re.Match) -> str:
    """Canonical titles (Psalm superscriptions) are scripture; other titles and speaker labels are not."""
    return (
        f" {match.group(3)} " if match.group(1) == "title" and 'canonical="true"' in match.group(2) else " "
    )


def clean_osis(raw: str) -> str:
    """OSIS markup of a run of verses -> plain text."""
    glossary = _GLOSSARY.search(raw)
    if glossary:
        raw = raw[: glossary.start()]
    text = _NOTE.sub(_MARK, raw)
    text = _LABEL.sub(_label, text)
    text = _BLOCK.sub(" ", text)
    text = _TAG.sub("", text)
    text = _GLUED.sub(" ", text).replace(_MARK, "")
    text = html.unescape(text)
    text = _SPACE.sub(" ", text)
    return _SPACE_BEFORE_PUNCT.sub("", text).strip()


def _open_module(sword_dir: Path):
    try:
        from pysword.modules import SwordModules
    except ImportError as e:
        raise SourceUnavailable(f"source {NAME!r} needs the `pysword` package: pip install pysword") from e
    modules = SwordModules(str(sword_dir))
    found = modules.parse_modules()
    if MODULE not in found:
        raise SourceUnavailable(
            f"source {NAME!r}: SWORD module {MODULE} not found in {sword_dir} "
            f"(found: {sorted(found)}); delete {sword_dir.parents[2]} to refetch"
        )
    bible = modules.get_bible_from_module(MODULE)
    # pysword inflates a whole compressed block (here: a book) for every verse; keep the last few.
    if hasattr(bible, "_decompressed_text"):
        bible._decompressed_text = functools.lru_cache(maxsize=4)(bible._decompressed_text)
    return bible


def documents_from_module(bible, deuterocanon: bool = False) -> list[Document]:
    docs = []
    for testament in ("ot", "nt"):
        for book in bible.get_structure().get_books().get(testament, []):
            if book.osis_name in DEUTEROCANON and not deuterocanon:
                continue
            for chapter in range(1, book.num_chapters + 1):
                raw = bible.get(books=[book.osis_name], chapters=[chapter], clean=False, join=" ")
                text = clean_osis(raw)
                if text:
                    docs.append(Document(NAME, f"{book.osis_name}.{chapter}", text))
    return docs


def load() -> list[Document]:
    sword_dir = debian_package(PACKAGE, NAME) / SWORD_DIR
    if not (sword_dir / "mods.d").is_dir():
        raise SourceUnavailable(
            f"source {NAME!r}: {sword_dir}/mods.d is missing; delete {sword_dir.parents[2]} to refetch"
        )
    return documents_from_module(_open_module(sword_dir))
