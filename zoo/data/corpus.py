"""Specs -> documents -> a Corpus of per-source train / held-out documents."""

from __future__ import annotations

from collections.abc import Iterable

from zoo.data.document import Document
from zoo.data.fetch import SourceUnavailable, log
from zoo.data.sources import EMBEDDED_SOURCES, load_embedded
from zoo.data.split import split_documents

DEFAULT_SPECS = EMBEDDED_SOURCES


def load_documents(spec: str) -> list[Document]:
    """Documents for one spec: an embedded source ("austen", "bible", "brown"), a text file, a folder
    of text files or a glob (one document per file), "hf:<name>[:<config>][@<split>]", or
    "retrieval:<spec>[?keys=K&count=N&words=W]" (synthetic key retrieval over that spec's text,
    zoo.data.retrieval)."""
    from zoo.data.files import is_glob, load_files, matching_files
    from zoo.data.hf import PREFIX, load_hf
    from zoo.data.retrieval import PREFIX as RETRIEVAL
    from zoo.data.retrieval import retrieval_documents

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a data spec must be a non-empty string, got {spec!r}")
    if spec.startswith(RETRIEVAL):
        docs = retrieval_documents(spec, load_documents)
    elif spec in EMBEDDED_SOURCES:
        docs = load_embedded(spec)
    elif spec.startswith(PREFIX):
        docs = load_hf(spec)
    elif is_glob(spec) or matching_files(spec):
        docs = load_files(spec)
    else:
        raise ValueError(
            f"unknown data spec {spec!r}: not an embedded source ({', '.join(EMBEDDED_SOURCES)}), "
            f"not an existing file, folder or glob of text files, and not hf:<dataset>[:<config>][@<split>]"
        )
    if not docs:
        raise ValueError(f"data spec {spec!r} gave no documents (no non-empty text files matched)")
    return docs


def spec_problem(spec: str) -> str | None:
    """Why `spec` cannot name documents, found without loading anything (None: it looks loadable).

    Checks the form only: an embedded name, an hf: spec, or a file, folder or glob that exists. Whether
    an embedded source can be fetched, or a dataset downloaded, shows only when it loads."""
    import difflib

    from zoo.data.files import is_glob, matching_files
    from zoo.data.hf import PREFIX, parse_hf_spec
    from zoo.data.retrieval import PREFIX as RETRIEVAL
    from zoo.data.retrieval import parse_retrieval_spec

    if not isinstance(spec, str) or not spec.strip():
        return f"a data spec must be a non-empty string, got {spec!r}"
    if spec.startswith(RETRIEVAL):
        try:
            source, _ = parse_retrieval_spec(spec)
        except ValueError as err:
            return str(err)
        return spec_problem(source)
    if spec in EMBEDDED_SOURCES:
        return None
    if spec.startswith(PREFIX):
        try:
            parse_hf_spec(spec)
        except ValueError as err:
            return str(err)
        return None
    if matching_files(spec):
        return None
    if is_glob(spec):
        return f"the glob {spec!r} matches no file"
    hint = difflib.get_close_matches(spec, EMBEDDED_SOURCES, n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    return (
        f"{spec!r}{did_you_mean} is not an embedded source ({', '.join(EMBEDDED_SOURCES)}), not an "
        "existing text file, folder or glob, not hf:<dataset>[:<config>][@<split>], and not "
        "retrieval:<spec>[?keys=K&count=N&words=W]"
    )


def _pick(splits: dict[str, list[Document]], source: str | Iterable[str] | None) -> list[Document]:
    names = list(splits) if source is None else [source] if isinstance(source, str) else list(source)
    unknown = [n for n in names if n not in splits]
    if unknown:
        raise KeyError(f"no source {unknown[0]!r} in this corpus; its sources are {list(splits)}")
    return [doc for n in names for doc in splits[n]]


class Corpus:
    """Documents by source, each source split by document into train and held-out."""

    def __init__(self, splits: dict[str, tuple[list[Document], list[Document]]]):
        self._train = {s: list(t) for s, (t, _) in splits.items()}
        self._heldout = {s: list(h) for s, (_, h) in splits.items()}
        self.sources: list[str] = list(splits)

    def train(self, source: str | Iterable[str] | None = None) -> list[Document]:
        """Training documents of one source, several, or all (None)."""
        return _pick(self._train, source)

    def heldout(self, source: str | Iterable[str] | None = None) -> list[Document]:
        """Held-out documents of one source, several, or all (None)."""
        return _pick(self._heldout, source)

    def stats(self) -> dict[str, dict]:
        """Per source: train/held-out documents and characters."""
        return {
            s: {
                "train_documents": len(self._train[s]),
                "train_characters": sum(len(d.text) for d in self._train[s]),
                "heldout_documents": len(self._heldout[s]),
                "heldout_characters": sum(len(d.text) for d in self._heldout[s]),
            }
            for s in self.sources
        }

    def token_stats(self, tokenizer) -> dict[str, dict]:
        """`stats()` plus train/held-out tokens under `tokenizer` (tokenized once, then cached)."""
        from zoo.data.blocks import count_tokens

        out = self.stats()
        for s in self.sources:
            out[s]["train_tokens"] = count_tokens(tokenizer, self._train[s])
            out[s]["heldout_tokens"] = count_tokens(tokenizer, self._heldout[s])
        return out

    def __repr__(self) -> str:
        parts = [f"{s}: {len(self._train[s])}+{len(self._heldout[s])} docs" for s in self.sources]
        return f"Corpus({'; '.join(parts)})"


def load_corpus(
    specs: str | Iterable[str] = DEFAULT_SPECS,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    strict: bool = False,
) -> Corpus:
    """Load each spec and split it by document. A spec that fails is reported on stderr and skipped
    (raised when `strict`); it is an error only when no spec gives any documents."""
    specs = [specs] if isinstance(specs, str) else list(dict.fromkeys(specs))
    splits, failures = {}, []
    for spec in specs:
        try:
            docs = load_documents(spec)
        except (SourceUnavailable, ValueError, ImportError, OSError) as e:
            if strict:
                raise SourceUnavailable(f"data source {spec!r} failed to load: {e}") from e
            failures.append(f"{spec}: {e}")
            log(f"skipping data source {spec!r}: {e}")
            continue
        splits[spec] = split_documents(docs, heldout_fraction, seed)
    if not splits:
        raise SourceUnavailable(
            "no data source could be loaded:\n  " + "\n  ".join(failures or ["no specs given"])
        )
    return Corpus(splits)
