"""Language-modelling quality: next-token negative log-likelihood, perplexity and bits per byte.

Every function works on any Hugging Face causal LM (teacher, linearized, LoRA-wrapped): the model is
called as ``model(input_ids=..., use_cache=False)`` and only ``.logits`` is read. Log-softmax is
taken in fp32 over row chunks, so memory beyond the model's own logits stays bounded whatever the
vocabulary size.

Bits per byte divides out the tokenizer: bpb = nll / tokens / ln 2 / (bytes per token), so models
with different tokenizers can be compared on the same text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["nll", "perplexity", "bits_per_byte", "evaluate_texts", "evaluate_corpus", "model_device"]

#: fp32 elements per log-softmax chunk (64 MiB): rows per chunk = this // vocab size
_CHUNK_ELEMENTS = 1 << 24


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _summed_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum over positions of -log softmax(logits)[target], in fp32, a chunk of rows at a time.

    logits: [..., V]; targets: [...] (same leading shape)."""
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_targets = targets.reshape(-1).to(flat_logits.device)
    rows = max(1, _CHUNK_ELEMENTS // vocab)
    total = 0.0
    for start in range(0, flat_logits.shape[0], rows):
        chunk = flat_logits[start : start + rows].float()
        total += F.cross_entropy(chunk, flat_targets[start : start + rows], reduction="sum").item()
    return total


@torch.no_grad()
def nll(
    model: Any, blocks: torch.Tensor, batch_size: int = 8, device: torch.device | str | None = None
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) over ``blocks`` [N, T], and the number of
    predicted tokens, N * (T - 1): each block predicts its tokens 1..T-1 from the ones before.

    The model is put in eval mode for the call (its previous mode is restored). ``device`` defaults
    to the device of the model's parameters.
    """
    if blocks.dim() != 2:
        raise ValueError(f"blocks must be [N, T], got shape {tuple(blocks.shape)}")
    if blocks.shape[1] < 2:
        raise ValueError(f"blocks need at least 2 tokens each to predict one, got T={blocks.shape[1]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else model_device(model)
    was_training = getattr(model, "training", False)
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size].to(device=device, dtype=torch.long)
            logits = model(input_ids=batch, use_cache=False).logits
            total += _summed_token_nll(logits[:, :-1], batch[:, 1:])
            count += batch.shape[0] * (batch.shape[1] - 1)
            del logits
    finally:
        if was_training:
            model.train()
    return total, count


def perplexity(model: Any, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over ``blocks`` [N, T]."""
    total, count = nll(model, blocks, batch_size=batch_size)
    return math.exp(total / count)


def bits_per_byte(nll_nats: float, n_tokens: int, bytes_per_token: float) -> float:
    """Bits per UTF-8 byte: nll / n_tokens / ln 2 / bytes_per_token."""
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
    return nll_nats / n_tokens / math.log(2) / bytes_per_token


def evaluate_texts(
    model: Any,
    tokenizer: Any,
    texts_or_docs: Sequence[Any],
    block_size: int,
    max_blocks: int | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Perplexity and bits per byte of ``model`` on texts (or ``zoo.data.Document`` s).

    The texts are cut into blocks of ``block_size`` tokens (``zoo.data.token_blocks``, at most
    ``max_blocks``); bytes per token is measured on the same texts. Returns ``ppl``, ``bpb``,
    ``nll`` (mean nats per predicted token), ``tokens`` (predicted tokens) and ``blocks``.
    """
    from zoo.data import bytes_per_token, token_blocks  # the data layer sits above evaluation

    texts_or_docs = list(texts_or_docs)
    blocks = token_blocks(tokenizer, texts_or_docs, block_size, max_blocks=max_blocks)
    if blocks.shape[0] == 0:
        raise ValueError(f"no block of {block_size} tokens could be cut from {len(texts_or_docs)} text(s)")
    total, count = nll(model, blocks, batch_size=batch_size)
    bpt = bytes_per_token(tokenizer, texts_or_docs)
    return {
        "ppl": math.exp(total / count),
        "bpb": bits_per_byte(total, count, bpt),
        "nll": total / count,
        "tokens": count,
        "blocks": int(blocks.shape[0]),
    }


def evaluate_corpus(
    model: Any,
    tokenizer: Any,
    corpus: Any,
    sources: Iterable[str],
    block_size: int,
    max_blocks: int | None,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """``evaluate_texts`` on each source's held-out documents (``corpus.heldout(source)``)."""
    return {
        source: evaluate_texts(
            model, tokenizer, corpus.heldout(source), block_size, max_blocks=max_blocks, batch_size=batch_size
        )
        for source in sources
    }
