"""Decode speed and state memory of a causal LM (teacher or linearized) at growing context.

`measure_decode(model, contexts=[512, 1024, 2048], steps=8)` prefills one sequence of random tokens up
to each context in turn (carrying the cache), then times `steps` greedy single-token decoding steps
there (tokens/s from the median step, robust to a step slowed by other work on the machine); the next
context's prefill continues from the same cache, so every figure is at exactly the stated context. The state
is what the cache holds for one sequence: a linearized layer's mixer state
(`zoo.cache.ZooCache`), or a softmax layer's keys and values.

Extrapolation to longer contexts (default 8k and 32k, `state_bytes_extrapolated`) is made only where the
measured points prove the shape: the same bytes at every measured context ("constant": a linear
mixer, or a window hybrid whose window is full), bytes proportional to the context ("linear": a KV
cache), or, with three or more points, bytes exactly on one line ("linear": a mix of both kinds of
layer). A model with both kinds (some softmax layers kept) is also proven from two points by its parts,
measured apart: the mixer states the same at every context and the keys and values proportional to it.
Anything else (a window still filling at the measured contexts) gets None.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from zoo.cache import CACHE_ARG, state_bytes
from zoo.evaluate import model_device

__all__ = ["cache_state_bytes", "cache_state_parts", "extrapolate_state_bytes", "measure_decode"]


def cache_state_parts(cache: Any) -> tuple[int, int]:
    """(mixer-state bytes, key/value bytes) held for the sequence(s) in a transformers cache."""
    mixers = kv = 0
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "state"):  # zoo.cache.MixerStateLayer
            mixers += state_bytes(layer.state)
        elif getattr(layer, "keys", None) is not None:
            kv += state_bytes((layer.keys, layer.values))
    return mixers, kv


def cache_state_bytes(cache: Any) -> int:
    """Bytes held for the sequence(s) in a transformers cache: mixer states and keys/values."""
    return sum(cache_state_parts(cache))


def _extrapolate_by_parts(parts: dict[int, tuple[int, int]], target: int) -> int | None:
    """Bytes at `target` from {context: (mixer bytes, key/value bytes)} measured at two or more contexts,
    where each part's shape is proven on its own: the mixer bytes the same everywhere and the key/value
    bytes proportional to the context; else None."""
    ctx = sorted(parts)
    if len(ctx) < 2:
        return None
    mixers, last = {parts[c][0] for c in ctx}, ctx[-1]
    kv_last = parts[last][1]
    if len(mixers) != 1 or not all(parts[c][1] * last == kv_last * c for c in ctx):
        return None
    return mixers.pop() + kv_last * target // last


def extrapolate_state_bytes(
    points: dict[int, int], target: int, parts: dict[int, tuple[int, int]] | None = None
) -> tuple[int | None, str]:
    """(bytes at `target`, growth) from measured {context: bytes}; growth is "constant", "linear" or
    "irregular" (then the bytes are None: the points prove no shape). `parts`: the same contexts' (mixer
    bytes, key/value bytes), which prove a line from two points where the totals alone cannot."""
    ctx = sorted(points)
    if len(ctx) < 2:
        return None, "irregular"
    values = [points[c] for c in ctx]
    if len(set(values)) == 1:
        return values[0], "constant"
    if all(points[c] * ctx[-1] == values[-1] * c for c in ctx):  # proportional, as a KV cache
        return values[-1] * target // ctx[-1], "linear"
    c0, c1 = ctx[-2], ctx[-1]
    slope_num, slope_den = points[c1] - points[c0], c1 - c0
    collinear = len(ctx) >= 3 and all(
        (points[c] - points[c0]) * slope_den == slope_num * (c - c0) for c in ctx
    )
    if collinear:
        return points[c1] + slope_num * (target - c1) // slope_den, "linear"
    by_parts = None if parts is None else _extrapolate_by_parts(parts, target)
    if by_parts is not None:
        return by_parts, "linear"
    return None, "irregular"


def _vocab_size(model: Any) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


@torch.no_grad()
def measure_decode(
    model: Any,
    contexts: Sequence[int],
    steps: int = 8,
    seed: int = 0,
    extrapolate_to: Sequence[int] = (8_192, 32_768),
) -> dict[str, Any]:
    """Decode tokens/s and state bytes at each context (tokens) for one sequence; see the module doc.

    Returns ``{"contexts": {"<ctx>": {"decode_tokens_per_s", "decode_ms_per_token", "state_bytes",
    "prefill_seconds"}}, "steps", "state_growth", "state_bytes_extrapolated": {"<target>": bytes}}``."""
    contexts = [int(c) for c in contexts]
    if not contexts or steps < 1:
        raise ValueError(f"decode: need at least one context and steps >= 1, got {contexts} and {steps}")
    if (
        contexts != sorted(contexts)
        or any(b - a <= steps for a, b in zip(contexts, contexts[1:]))
        or contexts[0] < 1
    ):
        raise ValueError(f"decode: contexts must grow by more than steps ({steps}) each time, got {contexts}")
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    vocab = _vocab_size(model)
    was_training = getattr(model, "training", False)
    model.eval()
    cache, seen, rows = None, 0, {}
    try:
        for context in contexts:
            ids = torch.randint(vocab, (1, context - seen), generator=generator).to(device)
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{CACHE_ARG: cache})
            prefill = time.perf_counter() - t0
            cache = getattr(out, CACHE_ARG)
            mixer_bytes, kv_bytes = cache_state_parts(cache)
            held = mixer_bytes + kv_bytes
            if held == 0:  # a cache no layer wrote to: every decode step would start from nothing
                raise RuntimeError(
                    f"decode: after a {context}-token prefill the model's cache "
                    f"({type(cache).__name__}) holds no state; the cache argument "
                    f"{CACHE_ARG!r} did not reach its layers (a transformers version whose "
                    "cache argument zoo does not know?)"
                )
            token = out.logits[:, -1:].argmax(-1)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                out = model(input_ids=token, use_cache=True, **{CACHE_ARG: cache})
                cache, token = getattr(out, CACHE_ARG), out.logits[:, -1:].argmax(-1)
                times.append(time.perf_counter() - t0)
            seen = context + steps
            step = statistics.median(times)  # robust to a step slowed by other work on the machine
            rows[str(context)] = {
                "decode_tokens_per_s": 1.0 / step,
                "decode_ms_per_token": 1e3 * step,
                "state_bytes": held,
                "mixer_state_bytes": mixer_bytes,
                "kv_cache_bytes": kv_bytes,
                "prefill_seconds": prefill,
            }
    finally:
        if was_training:
            model.train()
    points = {int(c): r["state_bytes"] for c, r in rows.items()}
    parts = {int(c): (r["mixer_state_bytes"], r["kv_cache_bytes"]) for c, r in rows.items()}
    extrapolated = {str(t): extrapolate_state_bytes(points, t, parts)[0] for t in extrapolate_to}
    return {
        "contexts": rows,
        "steps": steps,
        "state_growth": extrapolate_state_bytes(points, max(points), parts)[1],
        "state_bytes_extrapolated": extrapolated,
    }
