"""What `zoo bench speed` times: softmax attention (SDPA, FlashAttention) and each mixer, as "cases"
with the same three operations on one attention layer's q, k, v (and the layer input x):

- prefill(inputs) -> output: the forward pass without gradients, as timed;
- decode_state(inputs, output): the state decoding continues from after that prefill (a mixer's state
  is part of its forward; softmax attention's KV cache is laid out here, untimed);
- train(inputs): forward and backward (gradients to q, k, v, x and the mixer's own parameters);
- decode(state, step): one new token against the state of a context of T tokens;
- state_bytes(state): bytes of that state per batch (zoo.cache.state_bytes; the KV cache for softmax).

Shapes: q [B, H, T, D], k, v [B, Hkv, T, D], x [B, T, hidden] (the mixer contract).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from zoo.cache import state_bytes

__all__ = [
    "Inputs",
    "MixerCase",
    "SdpaCase",
    "FlashAttentionCase",
    "flash_attn_available",
    "make_inputs",
    "random_tensor",
]


@dataclass
class Inputs:
    """One layer's inputs: q [B, H, T, D], k, v [B, Hkv, T, D], x [B, T, hidden]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    x: torch.Tensor

    def requiring_grad(self) -> Inputs:
        return Inputs(*(t.detach().requires_grad_(True) for t in (self.q, self.k, self.v, self.x)))

    def clear_grads(self) -> None:
        for t in (self.q, self.k, self.v, self.x):
            t.grad = None


def random_tensor(shape, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """N(0, 1) entries, reproducible (drawn on the CPU)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def make_inputs(
    batch: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    hidden: int,
    seq_len: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> Inputs:
    """Random inputs: q, k, v ~ N(0, 1) (as after a projection and RoPE), x ~ N(0, 1) (an RMS-normed
    input)."""
    shapes = [
        (batch, heads, seq_len, head_dim),
        (batch, kv_heads, seq_len, head_dim),
        (batch, kv_heads, seq_len, head_dim),
        (batch, seq_len, hidden),
    ]
    return Inputs(*(random_tensor(shape, dtype, device, seed * 4 + i) for i, shape in enumerate(shapes)))


class SdpaCase:
    """torch's scaled_dot_product_attention, causal; decoding attends one query to a KV cache of T + 1."""

    kind, family, backend = "attention", "softmax", None

    def __init__(self, name: str = "sdpa"):
        self.name = name

    def prefill(self, inp: Inputs) -> Any:
        with torch.no_grad():
            return F.scaled_dot_product_attention(
                inp.q, inp.k, inp.v, is_causal=True, enable_gqa=inp.q.shape[1] != inp.k.shape[1]
            )

    def decode_state(self, inp: Inputs, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """A KV cache holding the T keys and values, with room for one more: [B, Hkv, T + 1, D] each."""
        B, Hkv, T, D = inp.k.shape
        kc, vc = (inp.k.new_zeros(B, Hkv, T + 1, D) for _ in range(2))
        kc[:, :, :T], vc[:, :, :T] = inp.k.detach(), inp.v.detach()
        return kc, vc

    def train(self, inp: Inputs, dy: torch.Tensor) -> None:
        y = F.scaled_dot_product_attention(
            inp.q, inp.k, inp.v, is_causal=True, enable_gqa=inp.q.shape[1] != inp.k.shape[1]
        )
        y.backward(dy)

    def decode(self, state: Any, step: Inputs) -> None:
        kc, vc = state
        T = kc.shape[2] - 1
        with torch.no_grad():
            kc[:, :, T:], vc[:, :, T:] = step.k, step.v
            F.scaled_dot_product_attention(step.q, kc, vc, enable_gqa=step.q.shape[1] != kc.shape[1])

    def state_bytes(self, state: Any) -> int:
        """The KV cache at context T (the slot reserved for the next token not counted)."""
        kc, vc = state
        return state_bytes((kc[:, :, :-1], vc[:, :, :-1]))


def flash_attn_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception:  # not installed, or built for another torch/CUDA
        return False
    return True


class FlashAttentionCase(SdpaCase):
    """flash-attn's flash_attn_func ([B, T, H, D] layout), causal; decoding: one query against the cache."""

    def __init__(self, name: str = "flash-attn"):
        super().__init__(name)
        from flash_attn import flash_attn_func

        self._fn = flash_attn_func

    def _attend(self, q, k, v, causal: bool):
        return self._fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(
            1, 2
        )

    def prefill(self, inp: Inputs) -> Any:
        with torch.no_grad():
            return self._attend(inp.q, inp.k, inp.v, causal=True)

    def train(self, inp: Inputs, dy: torch.Tensor) -> None:
        self._attend(inp.q, inp.k, inp.v, causal=True).backward(dy)

    def decode(self, state: Any, step: Inputs) -> None:
        kc, vc = state
        T = kc.shape[2] - 1
        with torch.no_grad():
            kc[:, :, T:], vc[:, :, T:] = step.k, step.v
            self._attend(step.q, kc, vc, causal=False)


@contextlib.contextmanager
def kernel_backend(name: str | None):
    """Force zoo's kernel backend (zoo.kernels.dispatch reads ZOO_KERNEL_BACKEND) inside the block."""
    if name is None:
        yield
        return
    old = os.environ.get("ZOO_KERNEL_BACKEND")
    os.environ["ZOO_KERNEL_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ZOO_KERNEL_BACKEND", None)
        else:
            os.environ["ZOO_KERNEL_BACKEND"] = old


class MixerCase:
    """A registered mixer with its default options, built for one layer shape; `backend` (optional)
    forces zoo's kernel backend for its calls."""

    kind = "mixer"

    def __init__(
        self,
        mixer_name: str,
        heads: int,
        kv_heads: int,
        head_dim: int,
        hidden: int,
        dtype: torch.dtype,
        device: torch.device,
        backend: str | None = None,
    ):
        from zoo.mixers import get_mixer

        cls = get_mixer(mixer_name)
        self.mixer_name, self.backend, self.family = mixer_name, backend, cls.family
        self.name = mixer_name if backend is None else f"{mixer_name}@{backend}"
        self.module = cls(heads, kv_heads, head_dim, hidden, 0).to(device=device, dtype=dtype)

    def prefill(self, inp: Inputs) -> Any:
        self.module.eval()
        with torch.no_grad(), kernel_backend(self.backend):
            return self.module(inp.q, inp.k, inp.v, inp.x)

    def decode_state(self, inp: Inputs, output: Any) -> Any:
        return output[1]

    def train(self, inp: Inputs, dy: torch.Tensor) -> None:
        self.module.train()
        self.module.zero_grad(set_to_none=True)
        with kernel_backend(self.backend):
            y, _ = self.module(inp.q, inp.k, inp.v, inp.x)
            y.backward(dy)

    def decode(self, state: Any, step: Inputs) -> None:
        self.module.eval()
        with torch.no_grad(), kernel_backend(self.backend):
            self.module(step.q, step.k, step.v, step.x, state=state)

    def state_bytes(self, state: Any) -> int:
        return state_bytes(state)
