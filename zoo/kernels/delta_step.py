"""One decoding token of the (gated) delta rule in one C call (csrc/delta_step.c).

`delta_step_in_c(q, k, v, beta, log_gate, state)` returns what `zoo.kernels.delta_rule.delta_rule` returns
for the same one-token call (y [B, H, 1, Dv] and the state S [B, H, Dk, Dv]), or None where it does not
apply: more than one token, not the CPU or not fp32, a gradient to take, or the kernel not built (no
compiler, ZOO_NATIVE=off, zoo.kernels.native.disabled()). The state handed in is not changed; the new one
is new memory.
"""

from __future__ import annotations

import ctypes

import torch

from zoo.kernels import native
from zoo.kernels.c_call import cpu_fp32_without_grad, pointer

__all__ = ["delta_step_in_c"]

_ARGTYPES = [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 8 + [ctypes.c_int]


def delta_step_in_c(q, k, v, beta, log_gate=None, state=None):
    """See the module docstring: (y, S) or None."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    if T != 1 or k.shape != q.shape or v.shape[:3] != q.shape[:3] or beta.shape != q.shape[:3]:
        return None
    if not cpu_fp32_without_grad(q, k, v, beta, log_gate, state):
        return None
    if (log_gate is not None and log_gate.shape != q.shape[:3]) or (
        state is not None and tuple(state.shape) != (B, H, Dk, Dv)
    ):
        return None
    fn = native.function("delta_step", "zoo_delta_step_f32", _ARGTYPES)
    if fn is None:
        return None
    q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))
    gate = None if log_gate is None else log_gate.contiguous()
    S_in = None if state is None else state.contiguous()
    y, S = q.new_empty(B, H, 1, Dv), q.new_empty(B, H, Dk, Dv)
    if fn(B, H, Dk, Dv, *(pointer(t) for t in (q, k, v, beta, gate, S_in, y, S)), torch.get_num_threads()):
        raise MemoryError("zoo's delta-rule step could not allocate its scratch row")
    return y, S
