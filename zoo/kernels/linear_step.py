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
from zoo.kernels.c_call import cpu_fp32_without_grad, pointer
from zoo.kernels.linear_attention import LinearAttentionState

__all__ = ["linear_step_in_c"]

_ARGTYPES = [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 4 + [ctypes.c_int] + [ctypes.c_void_p] * 2
_ARGTYPES += [ctypes.c_int, ctypes.c_float] + [ctypes.c_void_p] * 3 + [ctypes.c_int]


def linear_step_in_c(q, k, v, log_gate, state, normalize: bool, eps: float, kv_groups: int = 1):
    """See the module docstring: (y, LinearAttentionState) or None."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    if T != 1 or k.shape != q.shape or v.shape[:3] != q.shape[:3] or H % kv_groups:
        return None
    if not cpu_fp32_without_grad(q, k, v, log_gate, *(() if state is None else state)):
        return None
    kinds = {None: 0, q.shape[:3]: 1, q.shape: 2}  # no gate, one a head, one a key dimension
    kind = kinds.get(None if log_gate is None else log_gate.shape)
    Hkv = H // kv_groups
    if kind is None or (state is not None and tuple(state.S.shape) != (B, Hkv, Dk, Dv)):
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
    fn(
        *(B, H, kv_groups, Dk, Dv),
        *(pointer(t) for t in (q, k, v, gate)),
        kind,
        *(pointer(t) for t in (S_in, z_in)),
        int(normalize),
        eps,
        *(pointer(t) for t in (y, S, z)),
        torch.get_num_threads(),
    )
    return y, LinearAttentionState(S, z)
