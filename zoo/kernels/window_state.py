"""The window hybrid's state around a fused kernel: lay the cached slots before the new tokens, and
build the next WindowHybridState from that extended sequence (zoo.kernels.window_hybrid defines it).

Fused paths (Triton, FlexAttention) handle whole sequences without padding. They see the keys as one
extended sequence [state slots (L rows, unused ones zero), new tokens] and the queries as the new
tokens; the next state is the last L rows plus the linear state of everything older, one product:
differentiable by autograd, so gradients reach the state's tensors as in the PyTorch forms.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from zoo.kernels.window_hybrid import WindowHybridState, state_len


class Extended(NamedTuple):
    """Keys, values and key features of [state slots, new tokens] ([B, H, P + T, *]), the linear state
    of older keys (S0 [B, H, F, Dv], z0 [B, H, F], fp32), tokens seen before (n [B]) and P (0 or L)."""

    k: torch.Tensor
    v: torch.Tensor
    fk: torch.Tensor
    S0: torch.Tensor
    z0: torch.Tensor
    n_seen: torch.Tensor
    prefix: int


def extend_with_state(
    k, v, fk, state: WindowHybridState | None, window: int, terraced: bool, acc_dtype=torch.float32
) -> Extended:
    """Lay the cached slots of `state` (None: nothing) before k, v, fk [B, H, T, *]."""
    B, H, _, _ = k.shape
    if state is None:
        F_, Dv = fk.shape[-1], v.shape[-1]
        zeros = k.new_zeros(B, H, F_, Dv, dtype=acc_dtype)
        return Extended(k, v, fk, zeros, zeros[..., 0], torch.zeros(B, dtype=torch.long, device=k.device), 0)
    if state.window != window or state.terraced != terraced:
        raise ValueError(
            f"state was made with window={state.window}, terraced={state.terraced}; "
            f"called with window={window}, terraced={terraced}"
        )
    if state.k.shape[:2] != (B, H) or state.cached_tokens != state_len(window, terraced):
        raise ValueError(
            f"state holds {tuple(state.k.shape)} slots; expected [{B}, {H}, {state_len(window, terraced)}, D]"
        )
    # unused slots are zero already; the product also keeps gradients off them
    used = state.slot_valid()[:, None, :, None]
    ext = [
        torch.cat([(slots * used).to(x.dtype), x], dim=2)
        for slots, x in ((state.k, k), (state.v, v), (state.fk, fk))
    ]
    return Extended(*ext, state.S.to(acc_dtype), state.z.to(acc_dtype), state.n, state.cached_tokens)


def advance_state(
    ext: Extended, window: int, terraced: bool, like: WindowHybridState | None = None
) -> WindowHybridState:
    """The state after the extended sequence: its last L rows (right-aligned, zero-padded on the left
    when fewer), and S, z plus every older row's phi(k)^T v, phi(k). `like` (the state it continues)
    gives the slots' dtypes."""
    L = state_len(window, terraced)
    N = ext.k.shape[2]
    T = N - ext.prefix

    def last_rows(x, dtype):
        x = x[:, :, max(N - L, 0) :]
        if x.shape[2] < L:
            x = torch.cat([x.new_zeros(*x.shape[:2], L - x.shape[2], x.shape[3]), x], dim=2)
        return x.to(dtype)

    cut = N - L
    S, z = ext.S0, ext.z0
    if cut > 0:
        old_fk = ext.fk[:, :, :cut].to(S.dtype)
        S = S + old_fk.transpose(-1, -2) @ ext.v[:, :, :cut].to(S.dtype)
        z = z + old_fk.sum(2)
    # as WindowHybridState.empty: a fresh state keeps every slot in k's dtype
    dtypes = (ext.k.dtype,) * 3 if like is None else (like.k.dtype, like.v.dtype, like.fk.dtype)
    return WindowHybridState(
        last_rows(ext.k, dtypes[0]),
        last_rows(ext.v, dtypes[1]),
        last_rows(ext.fk, dtypes[2]),
        S,
        z,
        ext.n_seen + T,
        window,
        terraced,
    )
