"""A transformers `Cache` that holds each converted layer's mixer state.

Converted layers keep whatever their mixer returns as state (a linear mixer: a fixed-size matrix; a
window hybrid: its last window of keys/values plus a matrix); layers left as softmax attention keep
an ordinary growing KV cache. `model.generate` works unchanged on top of it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from transformers import LlamaForCausalLM
from transformers.cache_utils import DynamicCache, DynamicLayer

#: the keyword a causal LM's forward takes its cache by and the attribute its output returns it in:
#: `past_key_values` up to transformers 5.23, `cache` from 5.24 (which still reads the old name, with a
#: warning)
CACHE_ARG = (
    "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
)


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state: Any) -> Any:
    """Apply `fn` to every tensor in a mixer state (tensors, tuples, lists, dicts, dataclasses, None)."""
    if state is None or isinstance(state, (int, float, bool, str)):
        return state
    if isinstance(state, torch.Tensor):
        return fn(state)
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return dataclasses.replace(
            state,
            **{f.name: map_state(fn, getattr(state, f.name)) for f in dataclasses.fields(state) if f.init},
        )
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # namedtuple
        return type(state)(*(map_state(fn, s) for s in state))
    if isinstance(state, (tuple, list)):
        return type(state)(map_state(fn, s) for s in state)
    if isinstance(state, dict):
        return {key: map_state(fn, s) for key, s in state.items()}
    raise TypeError(f"cannot walk a mixer state of type {type(state).__name__}")


def state_bytes(state: Any) -> int:
    """Bytes held by the tensors of a mixer state. A state object with an `nbytes()` method counts itself
    (a window hybrid's state holds room past its slots while decoding, which its fields do not show)."""
    if not isinstance(state, torch.Tensor) and callable(getattr(state, "nbytes", None)):
        return int(state.nbytes())
    total = 0

    def count(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    map_state(count, state)
    return total


class MixerStateLayer(DynamicLayer):
    """One converted layer's entry: the mixer state and how many tokens it has seen."""

    is_croppable = False

    def __init__(self):
        super().__init__()
        self.state: Any = None
        self.seen = 0
        self.is_initialized = True

    def update(self, *args, **kwargs):
        raise RuntimeError("a converted layer keeps a mixer state, not keys and values")

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.seen = None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state = map_state(lambda t: t.index_select(0, beam_idx.to(t.device)), self.state)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.state = map_state(lambda t: t[indices], self.state)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a recurrent mixer state cannot be cropped (assisted decoding is not supported)"
        )

    def offload(self):
        self.state = map_state(lambda t: t.to("cpu", non_blocking=True), self.state)

    def prefetch(self):
        pass


class ZooCache(DynamicCache):
    """Per-layer mixer states for converted layers, a growing KV cache for the others."""

    def mixer_layer(self, layer_idx: int) -> MixerStateLayer:
        while len(self.layers) <= layer_idx:
            self.layers.append(DynamicLayer())
        layer = self.layers[layer_idx]
        if not isinstance(layer, MixerStateLayer):
            if layer.get_seq_length():
                raise RuntimeError(
                    f"layer {layer_idx} already holds keys/values; it cannot hold a mixer state"
                )
            layer = self.layers[layer_idx] = MixerStateLayer()
        return layer

    def state_bytes(self) -> int:
        """Bytes of every layer's state (mixer states and KV caches)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, MixerStateLayer):
                total += state_bytes(layer.state)
            elif getattr(layer, "is_initialized", False) and layer.keys is not None:
                total += state_bytes((layer.keys, layer.values))
        return total
