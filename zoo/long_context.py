"""Long context: perplexity by position, the free-window baseline and the share of its gap a mixer closes.

A block of `length` tokens starts at a held-out document's first token and runs on through the documents
after it (EOS between) when that one is shorter. Each predicted token is counted in the bucket of its
position p (the token at p predicted from tokens 0..p-1); `EDGES` cut the buckets 0-256, 256-1k, 1k-2k,
2k-4k and 4k-8k, the last one clipped at `length`. A bucket's perplexity is exp(mean NLL) over its tokens
in every block.

The free window is the teacher with its softmax attention cut to the last `window` tokens and the first
`sinks` ones (the `sliding-window` mixer, StreamingLLM), untrained: the mixer's own window (64 without one)
and at least 4 sinks (`free_window_of`). A linearizing mixer exists to beat it
past the window: `gap_closed` is the share of the gap between the free window and the teacher that a model
closes, taken on the mean NLL (log perplexity) of a bucket: 1 = as good as full attention, 0 = no better
than the free window, < 0 = worse than not training at all.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from zoo.evaluate import model_device

__all__ = [
    "EDGES",
    "buckets",
    "document_blocks",
    "position_nll",
    "bucket_table",
    "position_tables",
    "gap_closed",
    "free_window_model",
    "free_window_of",
    "window_of",
    "format_table",
    "long_context_table",
]

#: bucket edges in token positions
EDGES = (0, 256, 1024, 2048, 4096, 8192)
#: the free window of a mixer without one: StreamingLLM's 4 sinks and zoo's hybrids' 64-token window
DEFAULT_WINDOW, DEFAULT_SINKS = 64, 4
#: rows of logits per log-softmax (keeps [rows, vocab] fp32 small at any length)
_ROWS = 512


def buckets(length: int, edges: Sequence[int] = EDGES) -> list[tuple[int, int]]:
    """The (lo, hi) position ranges of a block of `length` tokens: each bucket that starts before `length`,
    the last clipped to it; positions past the last edge form one more bucket."""
    if length < 2:
        raise ValueError(f"long context: a block needs at least 2 tokens, got {length}")
    cuts = sorted({e for e in edges if 0 < e < length} | {0, length})
    return list(zip(cuts, cuts[1:]))


def label(lo: int, hi: int) -> str:
    return f"{lo}-{hi}"


def document_blocks(tokenizer: Any, docs: Sequence[Any], length: int, max_blocks: int | None = None):
    """[N, length] token ids, each block starting at a document's first token (EOS between documents); blocks
    do not overlap, so a short document is joined by the ones after it and the next block starts at the
    first document start after the block's end. A ValueError when the documents hold no such block."""
    from zoo.data.blocks import encode_texts, eos_id

    ids, lengths = encode_texts(tokenizer, list(docs))
    eos = eos_id(tokenizer)
    pieces, starts, at = [], [], 0
    for piece in torch.split(ids, lengths.tolist()):
        if not piece.numel():
            continue
        if pieces and eos is not None:
            pieces.append(torch.tensor([eos], dtype=torch.long))
            at += 1
        starts.append(at)
        pieces.append(piece)
        at += piece.numel()
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    rows, free_from = [], 0
    for start in starts:
        if start >= free_from and start + length <= stream.numel():
            rows.append(stream[start : start + length])
            free_from = start + length
            if max_blocks is not None and len(rows) >= max_blocks:
                break
    if not rows:
        raise ValueError(
            f"long context: the {len(starts)} document(s) hold {stream.numel()} tokens, not one block of "
            f"{length} from a document start; use a shorter length or more text"
        )
    return torch.stack(rows)


def _decoder_and_head(model: Any):
    """(decoder, lm head) of a Hugging Face causal LM, or None where it has no such parts."""
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return (decoder, head) if decoder is not None and head is not None else None


@torch.no_grad()
def position_nll(model: Any, blocks: torch.Tensor) -> torch.Tensor:
    """[T] float64: the NLL (nats) of the token at each position summed over `blocks` [N, T] (position 0,
    never predicted, is 0). One block at a time; the vocabulary projection runs `_ROWS` positions at a
    time, so memory stays linear in T whatever the vocabulary."""
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [N, T] with T >= 2, got shape {tuple(blocks.shape)}")
    device = model_device(model)
    parts = _decoder_and_head(model)
    was_training = getattr(model, "training", False)
    model.eval()
    sums = torch.zeros(blocks.shape[1], dtype=torch.float64)
    try:
        for row in blocks:
            ids = row[None].to(device)
            if parts is None:
                hidden, project = model(input_ids=ids, use_cache=False).logits[0], lambda h: h
            else:
                hidden, project = parts[0](input_ids=ids, use_cache=False).last_hidden_state[0], parts[1]
            for lo in range(0, ids.shape[1] - 1, _ROWS):
                hi = min(lo + _ROWS, ids.shape[1] - 1)
                logits = project(hidden[lo:hi]).float()
                nll = F.cross_entropy(logits, ids[0, lo + 1 : hi + 1], reduction="none")
                sums[lo + 1 : hi + 1] += nll.double().cpu()
    finally:
        if was_training:
            model.train()
    return sums


def bucket_table(sums: torch.Tensor, n_blocks: int, edges: Sequence[int] = EDGES) -> dict[str, dict]:
    """{"lo-hi": {"nll", "ppl", "tokens"}} from `position_nll`'s sums over `n_blocks` blocks."""
    table = {}
    for lo, hi in buckets(sums.numel(), edges):
        first = max(lo, 1)
        tokens = (hi - first) * n_blocks
        if tokens <= 0:
            continue
        nll = float(sums[first:hi].sum()) / tokens
        table[label(lo, hi)] = {"nll": nll, "ppl": math.exp(nll), "tokens": tokens}
    return table


def position_tables(
    model: Any, tokenizer: Any, docs_by_source: dict[str, Sequence[Any]], length: int, max_blocks: int
) -> dict[str, dict]:
    """Source -> `bucket_table` of `model` on up to `max_blocks` `document_blocks` of `length` tokens of each
    source's documents."""
    tables = {}
    for source, docs in docs_by_source.items():
        ids = document_blocks(tokenizer, docs, length, max_blocks=max_blocks)
        tables[source] = bucket_table(position_nll(model, ids), ids.shape[0])
    return tables


def gap_closed(model_nll: float, window_nll: float, teacher_nll: float) -> float | None:
    """(window - model) / (window - teacher) on mean NLL; None where the free window is within 0.01 nats
    of the teacher (no gap to close)."""
    gap = window_nll - teacher_nll
    return None if gap < 0.01 else (window_nll - model_nll) / gap


def free_window_of(mixer: str, options: dict | None = None) -> tuple[int, int]:
    """(window, sinks) of the free window to hold mixer `mixer` (with `options`) against: its own plain window
    (a terraced block of W tokens: W), else 64; and its sinks, at least 4. Sinks cost 4 tokens of state and
    StreamingLLM has them, so a baseline without them would flatter every mixer that has none."""
    from zoo.mixers import get_mixer

    config = get_mixer(mixer).check_options(dict(options or {}))
    return _window_and_sinks(config)


def _window_and_sinks(config: dict) -> tuple[int, int]:
    return int(config.get("window") or DEFAULT_WINDOW), max(int(config.get("sinks") or 0), DEFAULT_SINKS)


def window_of(model: Any) -> tuple[int, int]:
    """`free_window_of` for a converted model: from its first converted layer whose mixer has a window (the
    defaults, 64 and 4, for a model without one)."""
    from zoo.convert import linearized_layers

    for layer in linearized_layers(model):
        config = getattr(layer.mixer, "config", {})
        if config.get("window"):
            return _window_and_sinks(config)
    return DEFAULT_WINDOW, DEFAULT_SINKS


def free_window_model(teacher: Any, window: int = DEFAULT_WINDOW, sinks: int = DEFAULT_SINKS):
    """A copy of `teacher` whose every attention is its own softmax over the last `window` and first `sinks`
    tokens (the `sliding-window` mixer); `teacher` is left as it is."""
    from zoo.convert import linearize

    return linearize(copy.deepcopy(teacher), "sliding-window", window=window, sinks=sinks).eval()


def long_context_table(
    rows: dict[str, dict[str, dict]], window_and_sinks: tuple[int, int] | None = None
) -> dict[str, Any]:
    """`rows`: model name -> source -> bucket table; "teacher" and "free_window" among them (and, where
    measured, "fair_reference": the teacher with the run's LoRA budget). Adds to every other row, per source
    and bucket, the share of the free window's gap it closes; `window_and_sinks`: the free window's,
    recorded beside them."""
    shares: dict[str, dict] = {}
    teacher, window = rows.get("teacher"), rows.get("free_window")
    for name, per_source in rows.items():
        if name in ("teacher", "free_window", "fair_reference") or teacher is None or window is None:
            continue
        shares[name] = {
            source: {
                bucket: gap_closed(cell["nll"], window[source][bucket]["nll"], teacher[source][bucket]["nll"])
                for bucket, cell in table.items()
                if bucket in window.get(source, {}) and bucket in teacher.get(source, {})
            }
            for source, table in per_source.items()
        }
    return {
        "rows": rows,
        "gap_closed": shares,
        "free_window": list(window_and_sinks) if window_and_sinks else None,
    }


def format_table(table: dict[str, dict], names: dict[str, str] | None = None) -> list[str]:
    """`long_context_table`'s result as text lines: per source, each row's perplexity per bucket, then the
    share of the free window's gap each model row closes. `names`: display names of the rows."""
    names = names or {}
    rows, shares = table["rows"], table["gap_closed"]
    lines = []
    sources = list(next(iter(rows.values()), {}))
    for source in sources:
        cells = list(next(iter(rows.values()))[source])
        lines.append(f"{source:<30}" + "".join(f"{cell:>12}" for cell in cells))
        for name, per_source in rows.items():
            values = per_source.get(source, {})
            text = "".join(f"{values[c]['ppl']:>12.2f}" if c in values else f"{'-':>12}" for c in cells)
            lines.append(f"  {names.get(name, name):<28}{text}")
        for name, per_source in shares.items():
            values = per_source.get(source, {})
            text = "".join(
                f"{values[c]:>12.0%}" if values.get(c) is not None else f"{'-':>12}" for c in cells
            )
            lines.append(f"  {'gap closed: ' + names.get(name, name):<28}{text}")
    return lines
