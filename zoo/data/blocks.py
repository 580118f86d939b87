"""Texts -> fixed-size token blocks for training and evaluation, with tokenized text cached on disk."""

from __future__ import annotations

import hashlib
import json
import sys
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from zoo.data.cache import cache_dir
from zoo.data.document import Document, text_of

MIN_CACHED_CHARS = 65536  # smaller inputs are re-tokenized: quicker than a file
_PROBE = "Zoo probe: The quick brown fox jumps over the lazy dog; 1234 “quotes” — naïve café.\n\n  tabs\t."
_BATCH = 64
_FINGERPRINTS: weakref.WeakKeyDictionary = (
    weakref.WeakKeyDictionary()
)  # tokenizer -> ((name, size), fingerprint)


def _texts(docs_or_texts: Iterable[Document | str] | str) -> list[str]:
    if isinstance(docs_or_texts, (str, Document)):
        docs_or_texts = [docs_or_texts]
    return [text_of(x) for x in docs_or_texts]


def _is_hf_tokenizer(tokenizer) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(tokenizer, transformers.PreTrainedTokenizerBase)


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if _is_hf_tokenizer(tokenizer):
        out = []
        for i in range(0, len(texts), _BATCH):
            out += tokenizer(list(texts[i : i + _BATCH]), add_special_tokens=False, verbose=False)[
                "input_ids"
            ]
        return out
    try:
        return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    except TypeError:  # a bare encode(text)
        return [list(tokenizer.encode(t)) for t in texts]


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A stable id for a tokenizer's behaviour (name, vocabulary and a probe encoding), or None when
    it has no vocabulary to hash (then nothing is cached on disk)."""
    name, get_vocab = getattr(tokenizer, "name_or_path", None), getattr(tokenizer, "get_vocab", None)
    if not name or get_vocab is None:
        return None
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    try:
        memo = _FINGERPRINTS.get(tokenizer)
    except TypeError:  # not weak-referenceable
        memo = None
    if memo is not None and memo[0] == (str(name), size):
        return memo[1]
    h = hashlib.sha256()
    h.update(f"{type(tokenizer).__name__}\x1f{Path(str(name)).name}\x1f".encode())
    h.update(json.dumps(sorted(get_vocab().items()), ensure_ascii=False).encode())
    h.update(json.dumps(_encode(tokenizer, [_PROBE])).encode())
    fingerprint = h.hexdigest()[:24]
    try:
        _FINGERPRINTS[tokenizer] = ((str(name), size), fingerprint)
    except TypeError:
        pass
    return fingerprint


def _text_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(len(t).to_bytes(8, "little"))
        h.update(t.encode("utf-8", errors="surrogatepass"))
    return h.hexdigest()[:24]


def encode_texts(tokenizer, docs_or_texts) -> tuple[torch.Tensor, torch.Tensor]:
    """All token ids of the texts back to back (no special tokens) and each text's length in tokens."""
    texts = _texts(docs_or_texts)
    path = None
    if sum(map(len, texts)) >= MIN_CACHED_CHARS:
        fingerprint = tokenizer_fingerprint(tokenizer)
        if fingerprint is not None:
            path = cache_dir("tokens") / f"{fingerprint}-{_text_digest(texts)}.safetensors"
    if path is not None and path.is_file():
        from safetensors.torch import load_file

        saved = load_file(str(path))
        return saved["ids"].long(), saved["lengths"]
    encoded = _encode(tokenizer, texts)
    lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
    ids = torch.tensor([i for e in encoded for i in e], dtype=torch.long)
    if path is not None:
        from safetensors.torch import save

        from zoo.atomic import atomic_file

        dtype = torch.int32 if ids.numel() == 0 or int(ids.max()) < 2**31 else torch.long
        with atomic_file(path, "wb") as f:
            f.write(save({"ids": ids.to(dtype), "lengths": lengths}))
    return ids, lengths


def eos_id(tokenizer) -> int | None:
    """The tokenizer's end-of-sequence id (the first, where it lists several), or None."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return None if eos is None else int(eos)


def token_stream(tokenizer, docs_or_texts) -> torch.Tensor:
    """The texts' tokens in one 1-D LongTensor, `eos_token_id` between texts (none if the tokenizer has
    none)."""
    ids, lengths = encode_texts(tokenizer, docs_or_texts)
    pieces = [p for p in torch.split(ids, lengths.tolist()) if p.numel()]
    eos = eos_id(tokenizer)
    if eos is not None and len(pieces) > 1:
        sep = torch.tensor([eos], dtype=torch.long)
        pieces = [x for p in pieces for x in (p, sep)][:-1]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def token_blocks(
    tokenizer, docs_or_texts, block_size: int, max_blocks: int | None = None
) -> torch.LongTensor:
    """[N, block_size] token ids: the texts tokenized (no special tokens), joined with EOS between
    documents, cut into non-overlapping blocks (the remainder dropped); the first `max_blocks` only."""
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    if max_blocks is not None and max_blocks < 1:
        raise ValueError(f"max_blocks must be at least 1 (or None for all), got {max_blocks}")
    stream = token_stream(tokenizer, docs_or_texts)
    n = stream.numel() // block_size
    if n == 0:
        raise ValueError(
            f"the texts hold {stream.numel()} tokens (EOS separators included), fewer than "
            f"the {block_size} needed for one block of block_size={block_size}"
        )
    if max_blocks is not None:
        n = min(n, max_blocks)
    return stream[: n * block_size].view(n, block_size).clone()


def count_tokens(tokenizer, docs_or_texts) -> int:
    """Tokens in the texts (no special tokens, no separators)."""
    return int(encode_texts(tokenizer, docs_or_texts)[1].sum())


def bytes_per_token(tokenizer, docs_or_texts) -> float:
    """UTF-8 bytes per token over the texts (to turn nats per token into bits per byte)."""
    texts = _texts(docs_or_texts)
    tokens = count_tokens(tokenizer, texts)
    if tokens == 0:
        raise ValueError("bytes_per_token: the texts hold no tokens")
    return sum(len(t.encode("utf-8")) for t in texts) / tokens
