"""Sliding-window softmax through PyTorch's FlexAttention (torch.nn.attention.flex_attention).

The window hybrid with its linear branch off (b = 0, no c) is plain sliding-window softmax over the
window of zoo.kernels.window_hybrid (plain or terraced), whatever a > 0: the shared normalizer
divides a out. That is the window branch of `liger` and the "window" ablation of `lolcats`.
FlexAttention computes it from a block mask, so only the blocks inside the band are touched, and
continues a WindowHybridState: the cached slots come before the new tokens (zoo.kernels.window_state),
and the next state (slots, and S, z of the keys that leave the window) is built the same way as for
the Triton kernels. An option (ZOO_KERNEL_BACKEND=flex), never the automatic choice: compiled on
CUDA (torch.compile, which needs triton), eager (slow, unfused, and forward only: FlexAttention has
no CPU backward) on the CPU, for tests. Compiled, it needs head dims of at least 16 (seen on an H200
with torch 2.11: "embedding dimension ... must be at least 16"); `flex_fits` says so before a call.
"""

from __future__ import annotations

import functools

import torch

from zoo.kernels.window_hybrid import WindowHybridState
from zoo.kernels.window_state import advance_state, extend_with_state


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


#: the smallest query/key and value head dim the compiled (CUDA) FlexAttention kernel takes
MIN_COMPILED_HEAD_DIM = 16


def flex_fits(device: torch.device, head_dim: int, value_dim: int) -> bool:
    """Can FlexAttention run these head dims on `device` (eager on the CPU: any; compiled: >= 16)?"""
    return device.type == "cpu" or min(head_dim, value_dim) >= MIN_COMPILED_HEAD_DIM


def is_window_only(a, b, c) -> bool:
    """Is the hybrid with factors (a, b, c) plain window softmax: b = 0 given as a number (no gradient
    to it), no c, a > 0 (a number, or a tensor; its gradient is zero whatever it is)?"""
    return c is None and isinstance(b, (int, float)) and b == 0 and (not isinstance(a, (int, float)) or a > 0)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def window_softmax_flex(
    q, k, v, fk, *, window=64, terraced=False, scale=None, state: WindowHybridState | None = None
):
    """Sliding-window softmax of q [B, H, T, D] over k, v (and the cached slots of `state`). fk [B, H, T, F]
    are the key features only the next state keeps. Returns y [B, H, T, Dv] (q's dtype) and the state."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, T, D = q.shape
    if not flex_fits(q.device, D, v.shape[-1]):
        raise ValueError(
            f"FlexAttention on {q.device.type} needs head dims >= {MIN_COMPILED_HEAD_DIM}, got "
            f"q/k {D} and v {v.shape[-1]}; use the triton or torch backend"
        )
    ext = extend_with_state(k.to(q.dtype), v.to(q.dtype), fk, state, window, terraced)
    P, N = ext.prefix, ext.k.shape[2]
    first_used = P - ext.n_seen.clamp(max=P)  # [B]: slots before it are unused
    shift = ext.n_seen - P + 2 * window  # [B]: makes positions non-negative for the terraced blocks

    def in_window(b, h, i, j):
        e = i + P  # the query's row in the extended sequence
        if terraced:
            inside = (j + shift[b]) // window >= (e + shift[b]) // window - 1
        else:
            inside = e - j < window
        return (j <= e) & (j >= first_used[b]) & inside

    mask = create_block_mask(in_window, B, None, T, N, device=q.device)
    attend = _compiled_flex() if q.is_cuda else flex_attention
    y = attend(q, ext.k, ext.v, block_mask=mask, scale=D**-0.5 if scale is None else float(scale))
    return y.to(q.dtype), advance_state(ext, window, terraced, like=state)
