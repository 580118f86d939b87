"""The window hybrid's decoding step in few PyTorch ops: one new token per row, grouped heads in place.

`window_hybrid_decode` computes what zoo.kernels.window_hybrid.window_hybrid_step computes for the case
that `model.generate` hits at every token after the prompt: one real token per row (no padding), a state,
every row past its sinks. It takes keys, values and key features once per key/value head
([B, HKV, 1, *], HKV dividing the H query heads) and a state of HKV heads, and scores the G = H / HKV
query heads of a group together ([B, HKV, G, *] matmuls), so nothing is repeated to the query heads. It
uses about 40 tensor operations whatever the window (the general step: a Python loop over tokens, the
state repeated to the query heads and back, and some 150 operations per layer and token).

Why it is exact: the window slots are right-aligned, slot l (of L) holding position n - L + l when
l >= L - min(n, L), else zeros (WindowHybridState). For the new token at position n, slot l is inside the
window iff l >= 1 (plain window, L = W) or l >= W - n mod W (terraced, L = 2W), and the new token always
is; used slots before that are linear keys. The oldest slot leaves for the linear state: adding its
phi(k)^T v is exact whether it was used or not (unused slots are zero). Sinks at or before n and outside
its window are extra softmax columns (their key features are zero in the slots).

`decode_fits(state, key_mask, T, sinks)` says whether a call is such a case; other calls take the general
step.
"""

from __future__ import annotations

import torch

from zoo.kernels.window_hybrid import WindowHybridState, sink_open


def decode_fits(state: WindowHybridState | None, key_mask, T: int, sinks: int) -> bool:
    """One token per row, no padding, a state with a window, every row past its `sinks` first tokens."""
    if state is None or T != 1 or state.window < 1 or state.sinks != sinks:
        return False
    if key_mask is not None and not bool(key_mask.bool().all()):
        return False
    return not sinks or int(state.n.min()) >= sinks


def _window_masks(n: torch.Tensor, L: int, window: int, terraced: bool):
    """[B, 1, 1, L + 1] (inside the window, linear) masks of the slots and the new token for query
    position n [B]."""
    used_from = L - n.clamp(max=L)
    win_from = (window - n % window) if terraced else torch.ones_like(n)
    win_from = torch.maximum(win_from, used_from)
    slot = torch.arange(L + 1, device=n.device)
    win = slot >= win_from[:, None]
    lin = (slot >= used_from[:, None]) & ~win
    return win[:, None, None], lin[:, None, None]


def window_hybrid_decode(
    q, k, v, fq, fk, a, b, *, window: int, terraced: bool, state: WindowHybridState, scale=None, c=None
):
    """q [B, H, 1, D], fq [B, H, 1, F], k [B, HKV, 1, D], v [B, HKV, 1, Dv], fk [B, HKV, 1, F]; a, b, c
    per query head ([H], floats or None for c); `state` of HKV heads (its sinks, if any, already full).
    Returns y [B, H, 1, Dv] in q's dtype and the next state (see the module docstring)."""
    B, H, _, D = q.shape
    HKV, F_, DV = k.shape[1], fq.shape[-1], v.shape[-1]
    G, L = H // HKV, state.cached_tokens
    if state.window != window or state.terraced != terraced or state.k.shape[1] != HKV:
        raise ValueError(
            f"state of window={state.window}, terraced={state.terraced}, {state.k.shape[1]} heads; called "
            f"with window={window}, terraced={terraced}, {HKV} key/value heads"
        )
    cdt = torch.promote_types(q.dtype, torch.float32)
    scale = D**-0.5 if scale is None else scale

    def per_head(f):  # a factor for each query head, as [1, HKV, G, 1]
        return torch.as_tensor(f, dtype=cdt, device=q.device).expand(H).reshape(1, HKV, G, 1)

    kk = torch.cat([state.k, k.to(state.k.dtype)], 2)  # [B, HKV, L + 1, *]: the slots, then the token
    vv = torch.cat([state.v, v.to(state.v.dtype)], 2)
    ff = torch.cat([state.fk, fk.to(state.fk.dtype)], 2)
    qg = q.reshape(B, HKV, G, D).to(cdt)
    fqg = fq.reshape(B, HKV, G, F_).to(cdt)
    win, lin = _window_masks(state.n, L, window, terraced)
    s = (qg @ kk.to(cdt).transpose(-1, -2)).mul_(scale).masked_fill_(~win, float("-inf"))
    lw = fqg @ ff.to(cdt).transpose(-1, -2)
    m = s.amax(-1, keepdim=True)
    if state.sinks:
        closed = ~sink_open(state.n, state.sinks, window, terraced)[:, None, None]  # [B, 1, 1, S]
        s_sink = (qg @ state.sink_k.to(cdt).transpose(-1, -2)).mul_(scale).masked_fill_(closed, float("-inf"))
        m = torch.maximum(m, s_sink.amax(-1, keepdim=True))
    fa, fb = per_head(a), per_head(b)
    lin_coef = fb * lin if c is None else fb * lin + per_head(c) * win
    w = (s - m).exp_().mul_(fa).add_(lw * lin_coef)
    S, z = state.S.to(cdt), state.z.to(cdt)
    num = w @ vv.to(cdt) + fb * (fqg @ S)
    den = w.sum(-1, keepdim=True) + fb * (fqg @ z[..., None])
    if state.sinks:
        w_sink = (s_sink - m).exp_().mul_(fa)
        num = num + w_sink @ state.sink_v.to(cdt)
        den = den + w_sink.sum(-1, keepdim=True)
    y = (num / den).reshape(B, H, 1, DV).to(q.dtype)

    # the oldest slot leaves the window for the linear state (a zero slot adds nothing), the token enters
    f0, v0 = ff[:, :, 0].to(S.dtype), vv[:, :, 0].to(S.dtype)
    new = WindowHybridState(
        kk[:, :, 1:],
        vv[:, :, 1:],
        ff[:, :, 1:],
        (S + f0[..., None] * v0[..., None, :]).to(state.S.dtype),
        (z + f0).to(state.z.dtype),
        state.n + 1,
        window,
        terraced,
        state.sink_k,
        state.sink_v,
    )
    return y, new
