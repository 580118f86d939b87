"""The unit of text the data layer hands out."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    """One document: the split into train and held-out text never cuts through one."""

    source: str  # the spec it came from: "austen", "bible", "brown", a path or glob, "hf:..."
    doc_id: str  # unique within its source, stable across runs (e.g. "emma/03", "Gen.1", "ca01")
    text: str


def text_of(item: Document | str) -> str:
    """The text of a Document, or the string itself."""
    return item.text if isinstance(item, Document) else item
