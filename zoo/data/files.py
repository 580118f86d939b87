"""The user's own text files: a file, a folder (its text files, recursively) or a glob; one document per
file."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from zoo.data.document import Document

TEXT_SUFFIXES = frozenset({".txt", ".text", ".md", ".markdown", ".rst", ".org", ".tex", ".html", ".htm"})


def is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def matching_files(spec: str) -> list[Path]:
    """The files a spec names: a glob's matches (any suffix), a folder's text files, or the one file."""
    expanded = os.path.expanduser(spec)
    if is_glob(spec):
        return sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    path = Path(expanded)
    if path.is_dir():
        return sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in TEXT_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    return [path] if path.is_file() else []


def load_files(spec: str) -> list[Document]:
    """Documents from the files `spec` names (UTF-8; empty files skipped). `source` is the spec itself."""
    root = Path(os.path.expanduser(spec))
    docs = []
    for path in matching_files(spec):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            doc_id = str(path.relative_to(root)) if root.is_dir() else str(path)
            docs.append(Document(spec, doc_id, text))
    return docs
