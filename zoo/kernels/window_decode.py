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

On the CPU in fp32, with every row at one position (what `generate` gives), the step runs as one C call
(zoo/kernels/csrc/window_decode.c, built on first use by zoo.kernels.native) instead of those 40
operations; where it cannot be built, or within `zoo.kernels.native.disabled()`, the PyTorch form below
runs. The two are compared in tests/kernels/test_window_decode.py.
"""

from __future__ import annotations

import ctypes

import torch

from zoo.kernels import native
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


#: masks of a batch whose rows all stand at one position, by what they depend on (a few dozen at most)
_SHARED_MASKS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _masks(n: torch.Tensor, L: int, window: int, terraced: bool, sinks: int):
    """(shut [B or 1, 1, 1, sinks + L + 1]: the columns sinks, slots, new token that are NOT softmax keys of
    the query; linear [B or 1, 1, 1, L + 1]: the slots and new token that are its linear keys) for query
    positions n [B]. Rows at one position (what `generate` gives) share masks made once per pattern: they
    depend on the position only through min(n, L), n mod W and which sinks are open, so a few dozen
    patterns serve a whole generation."""
    low, high = (int(x) for x in torch.aminmax(n))
    if low != high:
        win, lin = _window_masks(n, L, window, terraced)
        open_sinks = sink_open(n, sinks, window, terraced)[:, None, None]
        return torch.cat([~open_sinks, ~win], -1), lin
    used_from = L - min(low, L)
    win_from = max(window - low % window if terraced else 1, used_from)
    inside = (lambda i: i // window >= low // window - 1) if terraced else (lambda i: low - i < window)
    closed = tuple(not (i <= low and not inside(i)) for i in range(sinks))
    key = (n.device, L, used_from, win_from, closed)
    if key not in _SHARED_MASKS:
        slot = torch.arange(L + 1, device=n.device)
        shut = torch.cat([torch.tensor(closed, dtype=torch.bool, device=n.device), slot < win_from])
        lin = (slot >= used_from) & (slot < win_from)
        _SHARED_MASKS[key] = (shut.view(1, 1, 1, -1), lin.view(1, 1, 1, L + 1))
    return _SHARED_MASKS[key]


def _bmm(x: torch.Tensor, y: torch.Tensor, y_transposed: bool = False) -> torch.Tensor:
    """x [B, HKV, G, K] @ y [B, HKV, K, N] (or y [B, HKV, N, K] with y_transposed) -> [B, HKV, G, N], as one
    batched matmul (4-d matmul broadcasting costs several more small operations)."""
    b, h = x.shape[:2]
    y3 = y.reshape(b * h, *y.shape[2:])
    out = torch.bmm(x.reshape(b * h, *x.shape[2:]), y3.transpose(1, 2) if y_transposed else y3)
    return out.view(b, h, *out.shape[1:])


def window_hybrid_decode(
    q, k, v, fq, fk, a, b, *, window: int, terraced: bool, state: WindowHybridState, scale=None, c=None
):
    """q [B, H, 1, D], fq [B, H, 1, F], k [B, HKV, 1, D], v [B, HKV, 1, Dv], fk [B, HKV, 1, F]; a, b, c
    per query head ([H], floats or None for c); `state` of HKV heads (its sinks, if any, already full).
    Returns y [B, H, 1, Dv] in q's dtype and the next state (see the module docstring).

    The softmax columns are the sinks, the slots and the new token, scored in one matmul; the linear
    weights of the slots and the new token are added to theirs, so one matmul with the values and one sum
    give the window's numerator and denominator; two more read the linear state."""
    B, H, _, D = q.shape
    HKV, F_, DV = k.shape[1], fq.shape[-1], v.shape[-1]
    G, L, S = H // HKV, state.cached_tokens, state.sinks
    if state.window != window or state.terraced != terraced or state.k.shape[1] != HKV:
        raise ValueError(
            f"state of window={state.window}, terraced={state.terraced}, {state.k.shape[1]} heads; called "
            f"with window={window}, terraced={terraced}, {HKV} key/value heads"
        )
    cdt = torch.promote_types(q.dtype, torch.float32)
    scale = D**-0.5 if scale is None else scale
    shut, lin = _masks(state.n, L, window, terraced, S)
    fused = _fused_step(q, k, v, fq, fk, a, b, c, state, shut, lin, scale)
    if fused is not None:
        return fused

    def per_head(f):  # a factor for each query head, as [1, HKV, G, 1]
        return torch.as_tensor(f, dtype=cdt, device=q.device).expand(H).reshape(1, HKV, G, 1)

    sink_k = () if not S else (state.sink_k,)
    sink_v = () if not S else (state.sink_v,)
    kk = torch.cat([*sink_k, state.k, k.to(state.k.dtype)], 2)  # [B, HKV, S + L + 1, *]
    vv = torch.cat([*sink_v, state.v, v.to(state.v.dtype)], 2)
    ff = torch.cat([state.fk, fk.to(state.fk.dtype)], 2)  # [B, HKV, L + 1, F]: the slots, then the token
    qg = (q.reshape(B, HKV, G, D) * scale).to(cdt)
    fqg = fq.reshape(B, HKV, G, F_).to(cdt)
    fa, fb = per_head(a), per_head(b)
    w = _bmm(qg, kk.to(cdt), True).masked_fill_(shut, float("-inf"))  # [B, HKV, G, S + L + 1]
    w = w.sub_(w.amax(-1, keepdim=True)).exp_().mul_(fa)
    lin_coef = fb * lin if c is None else fb * lin + per_head(c) * ~shut[..., S:]
    w[..., S:].add_(_bmm(fqg, ff.to(cdt), True).mul_(lin_coef))
    Sz = state.S.to(cdt)
    num = _bmm(w, vv.to(cdt)).add_(_bmm(fqg, Sz).mul_(fb))
    den = w.sum(-1, keepdim=True).add_(_bmm(fqg, state.z.to(cdt)[..., None]).mul_(fb))
    y = num.div_(den).reshape(B, H, 1, DV).to(q.dtype)

    # the oldest slot leaves the window for the linear state (a zero slot adds nothing), the token enters
    f0, v0 = ff[:, :, 0].to(Sz.dtype), vv[:, :, S].to(Sz.dtype)
    new_S = torch.baddbmm(Sz.reshape(B * HKV, F_, DV), f0.reshape(B * HKV, F_, 1), v0.reshape(B * HKV, 1, DV))
    new = WindowHybridState(
        kk[:, :, S + 1 :],
        vv[:, :, S + 1 :],
        ff[:, :, 1:],
        new_S.view(B, HKV, F_, DV).to(state.S.dtype),
        (state.z + f0).to(state.z.dtype),
        state.n + 1,
        window,
        terraced,
        state.sink_k,
        state.sink_v,
    )
    return y, new


def _c_step():
    """The C function, its argument types set, or None where it is not available."""
    lib = native.library("window_decode")
    if lib is None:
        return None
    fn = lib.zoo_window_hybrid_decode_f32
    if fn.argtypes is None:
        fn.argtypes = [ctypes.c_int64] * 8 + [ctypes.c_void_p] * 17 + [ctypes.c_float] + [ctypes.c_void_p] * 6
        fn.argtypes += [ctypes.c_int]
        fn.restype = ctypes.c_int
    return fn


def _fused_step(q, k, v, fq, fk, a, b, c, state: WindowHybridState, shut, lin, scale):
    """The step as one C call: (y, next state), or None where it does not apply (not the CPU, not fp32
    throughout, rows at different positions, or no C kernel)."""
    sinks = () if state.sink_k is None else (state.sink_k, state.sink_v)
    tensors = (q, k, v, fq, fk, state.k, state.v, state.fk, state.S, state.z, *sinks)
    if q.device.type != "cpu" or shut.shape[0] != 1 or any(t.dtype != torch.float32 for t in tensors):
        return None
    fn = _c_step()
    if fn is None:
        return None
    B, H, _, D = q.shape
    HKV, F_, DV, L, S = k.shape[1], fq.shape[-1], v.shape[-1], state.cached_tokens, state.sinks

    def heads(f):
        return None if f is None else torch.as_tensor(f, dtype=torch.float32).expand(H).contiguous()

    a, b, c = heads(a), heads(b), heads(c)
    ins = [x.contiguous() for x in (q, fq, k, v, fk)]
    sinks = [state.sink_k.contiguous(), state.sink_v.contiguous()] if S else [None, None]
    win = [x.contiguous() for x in (state.k, state.v, state.fk, state.S, state.z)]
    y = q.new_empty(B, H, 1, DV)
    out = [torch.empty_like(x) for x in win]
    pointers = [x.data_ptr() if x is not None else None for x in (*ins, a, b, c, *sinks, *win, shut, lin)]
    outs = [x.data_ptr() for x in (y, *out)]
    threads = torch.get_num_threads() if B > 1 else 1
    failed = fn(B, HKV, H // HKV, D, DV, F_, L, S, *pointers, float(scale), *outs, threads)
    if failed:
        raise MemoryError("zoo's C decode step could not allocate its scratch space")
    new = WindowHybridState(*out, state.n + 1, state.window, state.terraced, state.sink_k, state.sink_v)
    return y, new
