"""A Hugging Face dataset as documents: spec "hf:<name>[:<config>][@<split>]", one row per document."""

from __future__ import annotations

from zoo.data.document import Document
from zoo.data.fetch import SourceUnavailable

PREFIX = "hf:"
TEXT_COLUMN = "text"


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """'hf:wikitext:wikitext-2-raw-v1@test' -> ('wikitext', 'wikitext-2-raw-v1', 'test'); split defaults to
    train."""
    if not spec.startswith(PREFIX) or not spec[len(PREFIX) :]:
        raise ValueError(
            f"not a Hugging Face dataset spec: {spec!r} (expected hf:<name>[:<config>][@<split>])"
        )
    body, _, split = spec[len(PREFIX) :].partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise ValueError(f"no dataset name in {spec!r} (expected hf:<name>[:<config>][@<split>])")
    return name, config or None, split or "train"


def load_hf(spec: str) -> list[Document]:
    name, config, split = parse_hf_spec(spec)
    try:
        import datasets
    except ImportError as e:
        raise SourceUnavailable(
            f"{spec!r} needs the Hugging Face `datasets` package: pip install datasets"
        ) from e
    try:
        table = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the hub, the cache and the dataset's own loader can all fail
        raise SourceUnavailable(
            f"could not load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
            f"{type(e).__name__}: {e}. Check the name, config and split, and that the hub is reachable "
            f"(or that the dataset is cached locally, with HF_DATASETS_OFFLINE=1)."
        ) from e
    columns = list(getattr(table, "column_names", None) or [])
    if TEXT_COLUMN not in columns:
        raise ValueError(f"Hugging Face dataset {name!r} has no {TEXT_COLUMN!r} column (columns: {columns})")
    return [
        Document(spec, f"{split}/{i}", text)
        for i, text in enumerate(table[TEXT_COLUMN])
        if isinstance(text, str) and text.strip()
    ]
