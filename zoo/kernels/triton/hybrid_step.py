"""Fused decoding step of the window hybrid: one token against a WindowHybridState, one program per
batch row and key/value head (its G query heads share the state, read in place: grouped-query attention
without repeating it). It scores the L cached slots and the new token (softmax inside the window, linear
weights outside, plus phi_q S, phi_q z for everything older), writes y, and writes the next state:
the slots shifted by one with the new token last, the evicted oldest slot (once n >= L) added to
S, z. Same math, same state layout as zoo.kernels.window_hybrid.window_hybrid_step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.kernels.triton.chunk_states import pow2_block
from zoo.kernels.triton.hybrid_kernels import sink_open_mask, window_start
from zoo.kernels.window_hybrid import WindowHybridState, drop_sink_features, updated_sink_slots


@triton.jit
def _fold_softmax(s, vals, m, acc_win, l_win):
    """Fold scores s [n] (-inf where masked) of keys with values vals [n, DV] into the running max m and
    the max-normalized window sums acc_win [DV], l_win."""
    m_new = tl.maximum(m, tl.max(s, 0))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new)
    return m_new, acc_win * alpha + tl.sum(p[:, None] * vals.to(tl.float32), 0), l_win * alpha + tl.sum(p, 0)


@triton.jit
def step_kernel(
    Q,
    K,
    V,
    FQ,
    FK,
    KS,
    VS,
    FKS,
    S,
    Z,
    NSEEN,
    REAL,
    A,
    BB,
    CC,
    SK,
    SV,
    Y,
    KS_OUT,
    VS_OUT,
    FKS_OUT,
    S_OUT,
    Z_OUT,
    H,
    scale,
    L: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    F: tl.constexpr,
    BL: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    BF: tl.constexpr,
    W: tl.constexpr,
    TERRACED: tl.constexpr,
    HAS_C: tl.constexpr,
    SINKS: tl.constexpr,
    BS: tl.constexpr,
    G: tl.constexpr,
):
    kv = tl.program_id(0).to(tl.int64)  # key/value head row b * H / G + h / G: one state, G query heads
    HKV = H // G
    b_idx = kv // HKV
    n_b = tl.load(NSEEN + b_idx).to(tl.int32)
    real = tl.load(REAL + b_idx) != 0

    od, ov, of = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BF)
    dmask, vmask, fmask = od < D, ov < DV, of < F
    ks_ptr, vs_ptr, fks_ptr = KS + kv * L * D, VS + kv * L * DV, FKS + kv * L * F
    k_new = tl.load(K + kv * D + od, mask=dmask, other=0.0)
    v_new = tl.load(V + kv * DV + ov, mask=vmask, other=0.0)
    fk_new = tl.load(FK + kv * F + of, mask=fmask, other=0.0)
    Sm = tl.load(
        S + kv * F * DV + of[:, None] * DV + ov[None, :], mask=fmask[:, None] & vmask[None, :], other=0.0
    )
    z = tl.load(Z + kv * F + of, mask=fmask, other=0.0)
    lo = window_start(L, n_b - L + 2 * W, W, TERRACED)
    first_used = L - tl.minimum(n_b, L)

    for g in range(G):
        bh = b_idx * H + (kv % HKV) * G + g
        h_idx = bh % H
        fa, fb = tl.load(A + h_idx), tl.load(BB + h_idx)
        fc = 0.0
        if HAS_C:
            fc = tl.load(CC + h_idx)
        q = tl.load(Q + bh * D + od, mask=dmask, other=0.0).to(tl.float32)
        fq = tl.load(FQ + bh * F + of, mask=fmask, other=0.0).to(tl.float32)
        # the new token (ext row L; the slots are rows 0 .. L-1) is always in its own window: start from it
        m = tl.sum(k_new.to(tl.float32) * q, 0) * scale
        l_win = tl.full([], 1.0, tl.float32)
        acc_win = v_new.to(tl.float32)
        w_new = fc * tl.sum(fk_new.to(tl.float32) * fq, 0)  # fc = 0 without c
        l_lin = w_new
        acc_lin = w_new * v_new.to(tl.float32)
        for l0 in range(0, L, BL):
            ol = l0 + tl.arange(0, BL)
            in_l = ol < L
            used = in_l & (ol >= first_used)
            win, lin = used & (ol >= lo), used & (ol < lo)
            ks = tl.load(
                ks_ptr + ol[:, None] * D + od[None, :], mask=in_l[:, None] & dmask[None, :], other=0.0
            )
            vs = tl.load(
                vs_ptr + ol[:, None] * DV + ov[None, :], mask=in_l[:, None] & vmask[None, :], other=0.0
            )
            fks = tl.load(
                fks_ptr + ol[:, None] * F + of[None, :], mask=in_l[:, None] & fmask[None, :], other=0.0
            )
            s = tl.where(win, tl.sum(ks.to(tl.float32) * q[None, :], 1) * scale, float("-inf"))
            m, acc_win, l_win = _fold_softmax(s, vs, m, acc_win, l_win)
            coef = tl.where(lin, fb, 0.0)
            if HAS_C:
                coef += tl.where(win, fc, 0.0)
            w = coef * tl.sum(fks.to(tl.float32) * fq[None, :], 1)
            acc_lin += tl.sum(w[:, None] * vs.to(tl.float32), 0)
            l_lin += tl.sum(w, 0)
        if SINKS > 0:  # the sinks outside the window (the new token's position is n_b)
            osk = tl.arange(0, BS)
            sk = tl.load(
                SK + kv * SINKS * D + osk[:, None] * D + od[None, :],
                mask=(osk[:, None] < SINKS) & dmask[None, :],
                other=0.0,
            )
            sv = tl.load(
                SV + kv * SINKS * DV + osk[:, None] * DV + ov[None, :],
                mask=(osk[:, None] < SINKS) & vmask[None, :],
                other=0.0,
            )
            sink_on = sink_open_mask(n_b, osk, SINKS, W, TERRACED)
            s = tl.where(sink_on, tl.sum(sk.to(tl.float32) * q[None, :], 1) * scale, float("-inf"))
            m, acc_win, l_win = _fold_softmax(s, sv, m, acc_win, l_win)
        num = fa * acc_win + acc_lin + fb * tl.sum(fq[:, None] * Sm, 0)
        den = fa * l_win + l_lin + fb * tl.sum(fq * z, 0)
        y = tl.where(real, num / tl.where(real, den, 1.0), 0.0)
        tl.store(Y + bh * DV + ov, y.to(Y.dtype.element_ty), mask=vmask)

    # the next state's slots: shifted by one, the new token last; a padding token changes nothing
    for l0 in range(0, L, BL):
        ol = l0 + tl.arange(0, BL)
        in_l = ol < L
        nxt = ol + 1
        nxt_ok = (nxt < L)[:, None]
        last = (ol == L - 1)[:, None]
        ks = tl.load(ks_ptr + ol[:, None] * D + od[None, :], mask=in_l[:, None] & dmask[None, :], other=0.0)
        vs = tl.load(vs_ptr + ol[:, None] * DV + ov[None, :], mask=in_l[:, None] & vmask[None, :], other=0.0)
        fks = tl.load(fks_ptr + ol[:, None] * F + of[None, :], mask=in_l[:, None] & fmask[None, :], other=0.0)
        ks2 = tl.load(ks_ptr + nxt[:, None] * D + od[None, :], mask=nxt_ok & dmask[None, :], other=0.0)
        vs2 = tl.load(vs_ptr + nxt[:, None] * DV + ov[None, :], mask=nxt_ok & vmask[None, :], other=0.0)
        fks2 = tl.load(fks_ptr + nxt[:, None] * F + of[None, :], mask=nxt_ok & fmask[None, :], other=0.0)
        ks2 = tl.where(real, tl.where(last, k_new[None, :].to(ks2.dtype), ks2), ks)
        vs2 = tl.where(real, tl.where(last, v_new[None, :].to(vs2.dtype), vs2), vs)
        fks2 = tl.where(real, tl.where(last, fk_new[None, :].to(fks2.dtype), fks2), fks)
        tl.store(
            KS_OUT + kv * L * D + ol[:, None] * D + od[None, :], ks2, mask=in_l[:, None] & dmask[None, :]
        )
        tl.store(
            VS_OUT + kv * L * DV + ol[:, None] * DV + ov[None, :], vs2, mask=in_l[:, None] & vmask[None, :]
        )
        tl.store(
            FKS_OUT + kv * L * F + ol[:, None] * F + of[None, :], fks2, mask=in_l[:, None] & fmask[None, :]
        )
    # the oldest slot leaves the window once the slots are full
    evict = real & (n_b >= L)
    fk0 = tl.load(fks_ptr + of, mask=fmask, other=0.0).to(tl.float32)
    v0 = tl.load(vs_ptr + ov, mask=vmask, other=0.0).to(tl.float32)
    tl.store(
        S_OUT + kv * F * DV + of[:, None] * DV + ov[None, :],
        Sm + tl.where(evict, fk0[:, None] * v0[None, :], 0.0),
        mask=fmask[:, None] & vmask[None, :],
    )
    tl.store(Z_OUT + kv * F + of, z + tl.where(evict, fk0, 0.0), mask=fmask)


def step_constants(
    L: int, D: int, DV: int, F: int, window: int, terraced: bool, has_c: bool, sinks: int = 0, groups: int = 1
) -> dict:
    """The step kernel's compile-time constants (slots are read in tiles of at most 32)."""
    return dict(
        G=groups,
        SINKS=sinks,
        BS=pow2_block(max(sinks, 1), lo=1),
        L=L,
        D=D,
        DV=DV,
        F=F,
        BL=pow2_block(L, lo=1, hi=32),
        BD=pow2_block(D, lo=1),
        BDV=pow2_block(DV, lo=1),
        BF=pow2_block(F, lo=1),
        W=window,
        TERRACED=terraced,
        HAS_C=has_c,
    )


def step_one_token(q, k, v, fq, fk, a, b, c, state: WindowHybridState, real: torch.Tensor, scale: float):
    """q [B, H, D], fq [B, H, F], k [B, HKV, D], v [B, HKV, Dv], fk [B, HKV, F] (one token; HKV divides H,
    the state has HKV heads), a, b, c [H] fp32 (c may be None), real [B] bool. Returns y [B, H, Dv] (v's
    dtype) and the next state. With sinks, a token at a position below the state's sinks fills its sink
    slot (before the kernel reads them: its own window holds it) and enters the window slots with its key
    features zeroed."""
    B, H, D = q.shape
    HKV, DV, F = k.shape[1], v.shape[-1], fq.shape[-1]
    sinks = state.sinks
    if sinks:
        fk = drop_sink_features(fk[:, :, None], real[:, None], state.n, sinks)[:, :, 0]
        sink_k, sink_v = updated_sink_slots(k[:, :, None], v[:, :, None], real[:, None], state, sinks)
        sink_k, sink_v = sink_k.contiguous(), sink_v.contiguous()
    else:
        sink_k = sink_v = q
    ks, vs, fks = (x.contiguous() for x in (state.k, state.v, state.fk))
    S, z = state.S.float().contiguous(), state.z.float().contiguous()
    y = v.new_empty(B, H, DV)
    outs = [torch.empty_like(x) for x in (ks, vs, fks, S, z)]
    has_c = c is not None
    token = [x.contiguous() for x in (q, k, v, fq, fk)]
    step_kernel[(B * HKV,)](
        *token,
        ks,
        vs,
        fks,
        S,
        z,
        state.n,
        real.to(torch.int8),
        a,
        b,
        c if has_c else a,
        sink_k,
        sink_v,
        y,
        *outs,
        H,
        scale,
        **step_constants(state.cached_tokens, D, DV, F, state.window, state.terraced, has_c, sinks, H // HKV),
    )
    kept = (sink_k, sink_v) if sinks else ()
    return y, WindowHybridState(*outs, state.n + real.long(), state.window, state.terraced, *kept)
