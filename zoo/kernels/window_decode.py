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
from zoo.kernels._utils import same_objects
from zoo.kernels.positions import common_count
from zoo.kernels.window_hybrid import SlotBuffer, WindowHybridState, sink_open


def decode_fits(state: WindowHybridState | None, key_mask, T: int, sinks: int) -> bool:
    """One token per row, no padding, a state with a window, every row past its `sinks` first tokens."""
    if state is None or T != 1 or state.window < 1 or state.sinks != sinks:
        return False
    if key_mask is not None and not bool(key_mask.bool().all()):
        return False
    if not sinks:
        return True
    return (state.position if state.position is not None else int(state.n.min())) >= sinks


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


def _masks(n: torch.Tensor, L: int, window: int, terraced: bool, sinks: int, position: int | None = None):
    """(shut [B or 1, 1, 1, sinks + L + 1]: the columns sinks, slots, new token that are NOT softmax keys of
    the query; linear [B or 1, 1, 1, L + 1]: the slots and new token that are its linear keys) for query
    positions n [B]. Rows at one position (what `generate` gives) share masks made once per pattern: they
    depend on the position only through min(n, L), n mod W and which sinks are open, so a few dozen
    patterns serve a whole generation. `position`: every row's n, where the caller knows it."""
    low, high = (position, position) if position is not None else (int(x) for x in torch.aminmax(n))
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
    shut, lin = _masks(state.n, L, window, terraced, S, state.position)
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


#: a slot buffer holds this share of a window's L slots as room past them (at least one slot): the window
#: is copied into a new buffer every L // ROOM_SHARE tokens instead of at every token
ROOM_SHARE = 8


def room_slots(L: int) -> int:
    """Slots of room past a window of L slots in its slot buffer."""
    return max(1, L // ROOM_SHARE)


_ARGTYPES = {  # the C entries' argument types: 9 sizes, 17 arrays, the scale, 3 outputs, threads (+ fq_scale)
    "zoo_window_hybrid_decode_f32": [*[ctypes.c_int64] * 9, *[ctypes.c_void_p] * 17, ctypes.c_float]
    + [*[ctypes.c_void_p] * 3, ctypes.c_int],
}
_ARGTYPES["zoo_hedgehog_window_decode_f32"] = [*_ARGTYPES["zoo_window_hybrid_decode_f32"], ctypes.c_float]


def _room(state: WindowHybridState) -> tuple[SlotBuffer, int]:
    """(the slot buffer to append to, the offset of the state's slots in it): the state's own where its
    slots end at the buffer's first unwritten slot and room is left, else a new one, its slots copied in."""
    buf, L = state.slots, state.cached_tokens
    shared = buf is not None and state.k.untyped_storage().data_ptr() == buf.k.untyped_storage().data_ptr()
    if shared and buf.end < buf.capacity:
        offset = (state.k.storage_offset() - buf.k.storage_offset()) // state.k.stride(2)
        if offset + L == buf.end:
            return buf, offset
    B, H = state.k.shape[:2]
    made = [
        torch.empty(B, H, L + room_slots(L), x.shape[-1], dtype=x.dtype) for x in (state.k, state.v, state.fk)
    ]
    for into, slots in zip(made, (state.k, state.v, state.fk)):
        into[:, :, :L].copy_(slots)
    return SlotBuffer(*made, end=L), 0


class _CStep:
    """A layer's C decoding step bound to what stays the same from token to token: the entry, the weights
    a, b, c (and the Hedgehog maps), the sinks and the shapes. `_fused_step` makes one after its full
    checks and the states its steps make carry it, so that the next token checks only its own tensors."""

    def __init__(self, fn, state: WindowHybridState, q, a, b, c, maps, scale):
        B, H, _, D = q.shape
        HKV, F_, DV = state.k.shape[1], state.fk.shape[-1], state.v.shape[-1]
        self.fn, self.a, self.b, self.c, self.scale = fn, a, b, c, float(scale)
        self.maps = None if maps is None else maps[:2]
        self.sinks = () if state.sink_k is None else (state.sink_k, state.sink_v)

        def heads(f):  # a factor for each query head, [H] fp32 (a number is one for every head)
            return None if f is None else torch.as_tensor(f, dtype=torch.float32).expand(H).contiguous()

        # kept alive here: the C call gets their addresses
        self.held = [heads(f) for f in (a, b, c)] + [x.contiguous() for x in self.sinks]
        self.fixed = [None if x is None else x.data_ptr() for x in self.held[:3]]
        self.fixed += [x.data_ptr() for x in self.held[3:]] if self.sinks else [None, None]
        self.shape = (B, HKV, H // HKV, D, DV, F_)
        self.threads = min(torch.get_num_threads(), B * HKV)  # the units: rows x key/value heads

    def made_for(self, a, b, c, maps, scale) -> bool:
        """Whether this step was made for these weights (maps: (Wq, Wk), or None where the features are
        given) and this scale."""
        return (
            a is self.a
            and b is self.b
            and c is self.c
            and same_objects(maps, self.maps)
            and float(scale) == self.scale
        )

    def next_token(self, q, k, v, state: WindowHybridState, fq_scale: float):
        """The step for a state that this step made (so its sinks and position are this step's), the
        features computed from the maps: (y, next state) or None as `__call__`."""
        shut, lin = _masks(
            state.n, state.cached_tokens, state.window, state.terraced, state.sinks, state.position
        )
        return self(q, k, v, None, None, state, shut, lin, fq_scale)

    def __call__(self, q, k, v, fq, fk, state: WindowHybridState, shut, lin, fq_scale):
        """(y, next state), or None where the step does not apply (inputs not fp32 on the CPU, S or z not
        fp32, another batch, rows at different positions)."""
        B, HKV, G, D = self.shape[:4]
        if q.device.type != "cpu" or q.shape != (B, HKV * G, 1, D) or k.shape[1] != HKV or shut.shape[0] != 1:
            return None
        given = (fq, fk) if self.maps is None else self.maps
        ins = [x.contiguous() for x in (q, given[0], k, v, given[1])]
        if any(x.dtype != torch.float32 for x in ins):
            return None
        S, z = state.S, state.z
        if state.c_step is not self:  # a state this step made has its S, z and slots: contiguous fp32
            S, z = S.contiguous(), z.contiguous()
            if any(x.dtype != torch.float32 for x in (S, z, state.k, state.v, state.fk)):
                return None
        L = state.cached_tokens
        buf, offset = _room(state)
        H, DV = HKV * G, self.shape[4]
        y, new_S, new_z = q.new_empty(B, H, 1, DV), torch.empty_like(S), torch.empty_like(z)
        pointers = [x.data_ptr() for x in ins] + self.fixed
        pointers += [x.data_ptr() + offset * x.stride(2) * x.element_size() for x in (buf.k, buf.v, buf.fk)]
        pointers += [x.data_ptr() for x in (S, z, shut, lin)]
        sizes = (*self.shape, L, len(self.sinks) and self.sinks[0].shape[2], buf.capacity)
        outs = (y.data_ptr(), new_S.data_ptr(), new_z.data_ptr())
        extra = () if self.maps is None else (float(fq_scale),)
        if self.fn(*sizes, *pointers, self.scale, *outs, self.threads, *extra):
            raise MemoryError("zoo's C decode step could not allocate its scratch space")
        buf.end = offset + L + 1
        k2, v2, f2 = (x.narrow(2, offset + 1, L) for x in (buf.k, buf.v, buf.fk))
        new = WindowHybridState(
            k2, v2, f2, new_S, new_z, state.n + 1, state.window, state.terraced, *self.sinks
        )
        new.slots, new.c_step = buf, self
        # shared masks: every row at one position (read once, then carried as a number)
        new.position = (state.position if state.position is not None else int(state.n[0])) + 1
        return y, new


def _fused_step(q, k, v, fq, fk, a, b, c, state: WindowHybridState, shut, lin, scale, maps=None):
    """The step as one C call: (y, next state), or None where it does not apply (not the CPU, not fp32
    throughout, rows at different positions, or no C kernel). The token is appended to the state's slot
    buffer (`_room`), and the next state's slots are a view of it, so the window is not copied. With
    `maps` = (Wq [H, D, F/2], Wk [HKV, D, F/2], fq_scale), fq and fk are None and the C code computes
    the Hedgehog features itself."""
    fq_scale = None if maps is None else maps[2]
    step = state.c_step
    if isinstance(step, _CStep) and step.made_for(a, b, c, None if maps is None else maps[:2], scale):
        return step(q, k, v, fq, fk, state, shut, lin, fq_scale)  # a state this step made: its sinks
    sinks = () if state.sink_k is None else (state.sink_k, state.sink_v)
    given = (fq, fk) if maps is None else maps[:2]
    if q.device.type != "cpu" or any(t.dtype != torch.float32 for t in (*given, *sinks)):
        return None
    entry = "zoo_window_hybrid_decode_f32" if maps is None else "zoo_hedgehog_window_decode_f32"
    fn = native.function("window_decode", entry, _ARGTYPES[entry])
    if fn is None:
        return None
    return _CStep(fn, state, q, a, b, c, maps, scale)(q, k, v, fq, fk, state, shut, lin, fq_scale)


def hedgehog_window_decode(
    q,
    k,
    v,
    wq,
    wk,
    a,
    b,
    *,
    window: int,
    terraced: bool,
    state: WindowHybridState,
    scale,
    c=None,
    fq_scale: float = 1.0,
    sinks: int = 0,
):
    """The whole step of a window hybrid with Hedgehog feature maps, phi(x) = [softmax(x W),
    softmax(-x W)], as one C call: q [B, H, 1, D], k [B, HKV, 1, D], v [B, HKV, 1, Dv], the maps wq
    [H, D, F/2] and wk [HKV, D, F/2], the queries' features scaled by fq_scale. (y, next state) as
    `window_hybrid_decode` from the features would give, or None where the C step does not apply (then
    the caller takes its general path): not `decode_fits`, rows at different positions, not fp32 on the
    CPU, or no C kernel."""
    if not decode_fits(state, None, q.shape[2], sinks) or state.k.shape[1] != k.shape[1]:
        return None
    if state.window != window or state.terraced != terraced or wq.shape[0] != q.shape[1]:
        return None
    position = common_count(state.n, state.position)
    if position is None:
        return None
    shut, lin = _masks(state.n, state.cached_tokens, window, terraced, state.sinks, position)
    return _fused_step(q, k, v, None, None, a, b, c, state, shut, lin, scale, maps=(wq, wk, fq_scale))
