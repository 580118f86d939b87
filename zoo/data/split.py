"""A fixed train / held-out split by document, decided by a hash (never by random state)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from zoo.data.document import Document


def _rank(doc: Document, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}\x1f{doc.source}\x1f{doc.doc_id}".encode()).digest()


def split_documents(
    docs: Iterable[Document], heldout_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, held-out), whole documents only.

    Per source, the round(heldout_fraction * n) documents with the smallest hash of
    (seed, source, doc_id) are held out: the same documents every run, whatever their order.
    A source with at least 2 documents holds out at least 1 and keeps at least 1 for training
    (when heldout_fraction > 0). Both lists keep the input order.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    docs = list(docs)
    by_source: dict[str, list[int]] = {}
    for i, doc in enumerate(docs):
        by_source.setdefault(doc.source, []).append(i)
    heldout: set[int] = set()
    for indices in by_source.values():
        n = len(indices)
        k = round(heldout_fraction * n)
        if heldout_fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        ranked = sorted(indices, key=lambda i: (_rank(docs[i], seed), i))
        heldout.update(ranked[:k])
    return (
        [d for i, d in enumerate(docs) if i not in heldout],
        [d for i, d in enumerate(docs) if i in heldout],
    )
