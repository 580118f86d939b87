"""Which layers a recipe converts: None (all), a list of indices, or a slice string "start:stop[:step]"."""

from __future__ import annotations

import re

SLICE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*)?$")


def parse_slice(spec: str) -> tuple[int | None, int | None, int | None]:
    match = SLICE.match(spec)
    if not match:
        raise ValueError(f"layers {spec!r} is not a slice 'start:stop[:step]' (e.g. '0:16', '::2', '-4:')")
    start, stop, step = (int(g) if g is not None else None for g in match.groups())
    if step == 0:
        raise ValueError(f"layers {spec!r}: the step must not be 0")
    return start, stop, step


def parse_layers(spec: list[int] | str | None, num_layers: int) -> list[int]:
    """The layer indices named by ``spec`` in a model of ``num_layers`` layers.

    None: all layers. A list: those layers (negative ones count from the end), sorted. A string
    "start:stop[:step]": Python slice semantics, except that a start or stop beyond the model is an
    error rather than silently clipped. An empty selection is an error."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if spec is None:
        return list(range(num_layers))
    if isinstance(spec, str):
        start, stop, step = parse_slice(spec)
        if start is not None and not -num_layers <= start < num_layers:
            raise ValueError(f"layers {spec!r}: start {start} is out of range for {num_layers} layers")
        if stop is not None and not -num_layers <= stop <= num_layers:
            raise ValueError(f"layers {spec!r}: stop {stop} is out of range for {num_layers} layers")
        chosen = list(range(num_layers))[slice(start, stop, step)]
    elif isinstance(spec, (list, tuple)):
        chosen = []
        for layer in spec:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise ValueError(f"layers: {layer!r} is not a layer index")
            if not -num_layers <= layer < num_layers:
                raise ValueError(
                    f"layers: {layer} is out of range for {num_layers} layers "
                    f"(0..{num_layers - 1}, or negative from the end)"
                )
            chosen.append(layer % num_layers)
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"layers: {list(spec)} names a layer twice")
    else:
        raise ValueError(f"layers must be None, a list of ints or a 'start:stop[:step]' string, got {spec!r}")
    if not chosen:
        raise ValueError(f"layers {spec!r} selects no layer of {num_layers}")
    return sorted(chosen)
