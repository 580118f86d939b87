"""One decoding token of gated linear attention in one C call (csrc/linear_step.c), with the state kept once
per key/value head as zoo.kernels.dispatch keeps it (`kv_groups` query heads a state).

`linear_step_in_c(q, k, v, log_gate, state, normalize, eps, kv_groups)` returns what
`zoo.kernels.dispatch.linear_attention` returns for the same call on the PyTorch backend (y [B, H, 1, Dv]
and a `LinearAttentionState` with S [B, H / kv_groups, Dk, Dv], z [B, H / kv_groups, Dk] or None), or None
where it does not apply: more than one token, not the CPU or not fp32, a gradient to take, or the kernel
not built (no compiler, ZOO_NATIVE=off, zoo.kernels.native.disabled()). The state handed in is not
changed; the new one is new memory.
"""

from __future__ import annotations

import ctypes

import torch

from zoo.kernels import native
from zoo.kernels.linear_attention import LinearAttentionState

__all__ = ["linear_step_in_c"]

_ARGTYPES = [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 4 + [ctypes.c_int] + [ctypes.c_void_p] * 2
_ARGTYPES += [ctypes.c_int, ctypes.c_float] + [ctypes.c_void_p] * 3 + [ctypes.c_int]


def _fits(tensors) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    )


def linear_step_in_c(q, k, v, log_gate, state, normalize: bool, eps: float, kv_groups: int = 1):
    """See the module docstring: (y, LinearAttentionState) or None."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    if T != 1 or k.shape != q.shape or v.shape[:3] != q.shape[:3] or H % kv_groups:
        return None
    states = [] if state is None else [t for t in state if t is not None]
    if not _fits([q, k, v, *states, *([] if log_gate is None else [log_gate])]):
        return None
    kind = (
        0
        if log_gate is None
        else 1
        if log_gate.shape == q.shape[:3]
        else 2
        if log_gate.shape == q.shape
        else -1
    )
    Hkv = H // kv_groups
    if kind < 0 or (state is not None and tuple(state.S.shape) != (B, Hkv, Dk, Dv)):
        return None
    if normalize and state is not None and (state.z is None or tuple(state.z.shape) != (B, Hkv, Dk)):
        return None
    fn = native.function("linear_step", "zoo_linear_step_f32", _ARGTYPES, restype=None)
    if fn is None:
        return None
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    gate = None if log_gate is None else log_gate.contiguous()
    S_in = None if state is None else state.S.contiguous()
    z_in = None if state is None or not normalize else state.z.contiguous()
    y = q.new_empty(B, H, 1, Dv)
    S = q.new_empty(B, Hkv, Dk, Dv)
    z = q.new_empty(B, Hkv, Dk) if normalize else None

    def ptr(t):
        return None if t is None else t.data_ptr()

    fn(
        B,
        H,
        kv_groups,
        Dk,
        Dv,
        ptr(q),
        ptr(k),
        ptr(v),
        ptr(gate),
        kind,
        ptr(S_in),
        ptr(z_in),
        int(normalize),
        eps,
        ptr(y),
        ptr(S),
        ptr(z),
        torch.get_num_threads(),
    )
    return y, LinearAttentionState(S, z)
