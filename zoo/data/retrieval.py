"""Synthetic retrieval documents to mix into training: `retrieval:<source>[?keys=K&count=N&words=W]`.

Each document is W words of the source's text (a window of its training split, so no held-out text) with K
named five-digit keys hidden at random depths, then the question for one of them and its answer, in the
words of zoo.passkey's multi-key prompts::

    There is a pass key hidden ... <filler> The pass key of Chen is 41702. Remember it. <filler> ...
    What is the pass key of Chen? The pass key of Chen is 41702.

Trained on, these teach a mixer to hold a key over the filler (the LoLCATs authors report that needle
retrieval needed passkey samples in training). Defaults: K = 1, N = 500 documents, W = 600 words (about
800 tokens with SmolLM2's tokenizer). The documents depend only on the spec. The filler comes from the
source's training documents under the default split (held-out fraction 0.1, seed 0); `parse_retrieval`
reads a document back.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable

from zoo.data.document import Document

__all__ = [
    "PREFIX",
    "INTRO",
    "NAMED_NEEDLE",
    "NAMED_QUESTION",
    "NAMES",
    "parse_retrieval_spec",
    "retrieval_documents",
    "parse_retrieval",
]

PREFIX = "retrieval:"
#: the wording of the passkey prompts (zoo.passkey asks in the same words at evaluation)
INTRO = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key.\n\n"
)
NAMED_NEEDLE = " The pass key of {name} is {key}. Remember it. "
NAMED_QUESTION = "\n\nWhat is the pass key of {name}? The pass key of {name} is"
#: the owners of the keys in the multi-key variant
NAMES = ("Alice", "Bruno", "Chen", "Dara", "Elif", "Farid", "Greta", "Hiro")
DEFAULTS = {"keys": 1, "count": 500, "words": 600}
LIMITS = {"keys": (1, 8), "count": (1, 1_000_000), "words": (50, 1_000_000)}


def parse_retrieval_spec(spec: str) -> tuple[str, dict[str, int]]:
    """ "retrieval:austen?keys=4&count=100" -> ("austen", {"keys": 4, "count": 100, "words": 600}); a
    ValueError names what is wrong."""
    body = spec[len(PREFIX) :]
    source, _, query = body.partition("?")
    if not source:
        raise ValueError(f"{spec!r}: name the source of the filler, e.g. retrieval:austen?keys=4")
    options = dict(DEFAULTS)
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key not in DEFAULTS:
            raise ValueError(f"{spec!r}: unknown option {key!r}; allowed: {', '.join(DEFAULTS)}")
        lo, hi = LIMITS[key]
        if not value.isdigit() or not lo <= int(value) <= hi:
            raise ValueError(f"{spec!r}: {key} must be an integer from {lo} to {hi}, got {value!r}")
        options[key] = int(value)
    if source.startswith(PREFIX):
        raise ValueError(f"{spec!r}: the filler source cannot itself be a retrieval spec")
    return source, options


def retrieval_documents(spec: str, load: Callable[[str], list[Document]]) -> list[Document]:
    """The documents of a retrieval spec (see the module docstring); `load(spec)` gives the documents of
    the filler's source (zoo.data.corpus.load_documents)."""
    from zoo.data.split import split_documents

    source, o = parse_retrieval_spec(spec)
    train, _ = split_documents(load(source), 0.1, 0)
    words = " ".join(doc.text for doc in train).split()
    if len(words) < o["words"]:
        raise ValueError(
            f"{spec!r}: the training text of {source!r} holds {len(words)} words, fewer than {o['words']}"
        )
    rng = random.Random(int(hashlib.sha256(spec.encode()).hexdigest()[:16], 16))
    docs = []
    for i in range(o["count"]):
        start = rng.randrange(len(words) - o["words"] + 1)
        filler = words[start : start + o["words"]]
        keys = [rng.randint(10_000, 99_999) for _ in range(o["keys"])]
        cuts = sorted(rng.randrange(len(filler) + 1) for _ in keys)
        pieces, at = [], 0
        for n, cut in enumerate(cuts):
            pieces += filler[at:cut] + [NAMED_NEEDLE.format(name=NAMES[n], key=keys[n]).strip()]
            at = cut
        asked = rng.randrange(o["keys"])
        question = NAMED_QUESTION.format(name=NAMES[asked]).strip()
        text = f"{INTRO}{' '.join(pieces + filler[at:])}\n\n{question} {keys[asked]}."
        docs.append(Document(source=spec, doc_id=f"{i:06d}", text=text))
    return docs


_NEEDLE = re.compile(r"The pass key of (\w+) is (\d{5})\. Remember it\.")
_QUESTION = re.compile(r"What is the pass key of (\w+)\? The pass key of \1 is (\d{5})\.$")


def parse_retrieval(text: str) -> dict:
    """{"keys": {name: key}, "asked": name, "answer": key} of a retrieval document."""
    question = _QUESTION.search(text)
    if question is None:
        raise ValueError("not a retrieval document: no question and answer at its end")
    return {
        "keys": {name: int(key) for name, key in _NEEDLE.findall(text)},
        "asked": question.group(1),
        "answer": int(question.group(2)),
    }
