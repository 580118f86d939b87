"""Fused decoding step of the window hybrid: one token against a WindowHybridState, one program per
batch*head. It scores the L cached slots and the new token (softmax inside the window, linear
weights outside, plus phi_q S, phi_q z for everything older), writes y, and writes the next state:
the slots shifted by one with the new token last, the evicted oldest slot (once n >= L) added to
S, z. Same math, same state layout as zoo.kernels.window_hybrid.window_hybrid_step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.kernels.triton.chunk_states import pow2_block
from zoo.kernels.triton.hybrid_kernels import window_start
from zoo.kernels.window_hybrid import WindowHybridState


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
):
    bh = tl.program_id(0).to(tl.int64)
    b_idx, h_idx = bh // H, bh % H
    n_b = tl.load(NSEEN + b_idx).to(tl.int32)
    real = tl.load(REAL + b_idx) != 0
    fa, fb = tl.load(A + h_idx), tl.load(BB + h_idx)
    fc = 0.0
    if HAS_C:
        fc = tl.load(CC + h_idx)

    od, ov, of = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BF)
    dmask, vmask, fmask = od < D, ov < DV, of < F
    ks_ptr, vs_ptr, fks_ptr = KS + bh * L * D, VS + bh * L * DV, FKS + bh * L * F
    q = tl.load(Q + bh * D + od, mask=dmask, other=0.0).to(tl.float32)
    fq = tl.load(FQ + bh * F + of, mask=fmask, other=0.0).to(tl.float32)
    k_new = tl.load(K + bh * D + od, mask=dmask, other=0.0)
    v_new = tl.load(V + bh * DV + ov, mask=vmask, other=0.0)
    fk_new = tl.load(FK + bh * F + of, mask=fmask, other=0.0)

    # the new token (ext row L; the slots are rows 0 .. L-1) is always in its own window: start from it
    m = tl.sum(k_new.to(tl.float32) * q, 0) * scale
    coef_new = 0.0
    if HAS_C:
        coef_new = fc
    l_win = tl.full([], 1.0, tl.float32)
    acc_win = v_new.to(tl.float32)
    w_new = coef_new * tl.sum(fk_new.to(tl.float32) * fq, 0)
    l_lin = w_new
    acc_lin = w_new * v_new.to(tl.float32)
    lo = window_start(L, n_b - L + 2 * W, W, TERRACED)
    first_used = L - tl.minimum(n_b, L)
    for l0 in range(0, L, BL):
        ol = l0 + tl.arange(0, BL)
        in_l = ol < L
        used = in_l & (ol >= first_used)
        win, lin = used & (ol >= lo), used & (ol < lo)
        ks = tl.load(ks_ptr + ol[:, None] * D + od[None, :], mask=in_l[:, None] & dmask[None, :], other=0.0)
        vs = tl.load(vs_ptr + ol[:, None] * DV + ov[None, :], mask=in_l[:, None] & vmask[None, :], other=0.0)
        fks = tl.load(fks_ptr + ol[:, None] * F + of[None, :], mask=in_l[:, None] & fmask[None, :], other=0.0)
        s = tl.where(win, tl.sum(ks.to(tl.float32) * q[None, :], 1) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        acc_win = acc_win * alpha + tl.sum(p[:, None] * vs.to(tl.float32), 0)
        l_win = l_win * alpha + tl.sum(p, 0)
        m = m_new
        coef = tl.where(lin, fb, 0.0)
        if HAS_C:
            coef += tl.where(win, fc, 0.0)
        w = coef * tl.sum(fks.to(tl.float32) * fq[None, :], 1)
        acc_lin += tl.sum(w[:, None] * vs.to(tl.float32), 0)
        l_lin += tl.sum(w, 0)
        # next state's slots: shifted by one, the new token last; a padding token changes nothing
        nxt = ol + 1
        nxt_ok = (nxt < L)[:, None]
        last = (ol == L - 1)[:, None]
        ks2 = tl.load(ks_ptr + nxt[:, None] * D + od[None, :], mask=nxt_ok & dmask[None, :], other=0.0)
        vs2 = tl.load(vs_ptr + nxt[:, None] * DV + ov[None, :], mask=nxt_ok & vmask[None, :], other=0.0)
        fks2 = tl.load(fks_ptr + nxt[:, None] * F + of[None, :], mask=nxt_ok & fmask[None, :], other=0.0)
        ks2 = tl.where(real, tl.where(last, k_new[None, :].to(ks2.dtype), ks2), ks)
        vs2 = tl.where(real, tl.where(last, v_new[None, :].to(vs2.dtype), vs2), vs)
        fks2 = tl.where(real, tl.where(last, fk_new[None, :].to(fks2.dtype), fks2), fks)
        tl.store(
            KS_OUT + bh * L * D + ol[:, None] * D + od[None, :], ks2, mask=in_l[:, None] & dmask[None, :]
        )
        tl.store(
            VS_OUT + bh * L * DV + ol[:, None] * DV + ov[None, :], vs2, mask=in_l[:, None] & vmask[None, :]
        )
        tl.store(
            FKS_OUT + bh * L * F + ol[:, None] * F + of[None, :], fks2, mask=in_l[:, None] & fmask[None, :]
        )

    Sm = tl.load(
        S + bh * F * DV + of[:, None] * DV + ov[None, :], mask=fmask[:, None] & vmask[None, :], other=0.0
    )
    z = tl.load(Z + bh * F + of, mask=fmask, other=0.0)
    num = fa * acc_win + acc_lin + fb * tl.sum(fq[:, None] * Sm, 0)
    den = fa * l_win + l_lin + fb * tl.sum(fq * z, 0)
    y = tl.where(real, num / tl.where(real, den, 1.0), 0.0)
    tl.store(Y + bh * DV + ov, y.to(Y.dtype.element_ty), mask=vmask)
    # the oldest slot leaves the window once the slots are full
    evict = real & (n_b >= L)
    fk0 = tl.load(fks_ptr + of, mask=fmask, other=0.0).to(tl.float32)
    v0 = tl.load(vs_ptr + ov, mask=vmask, other=0.0).to(tl.float32)
    tl.store(
        S_OUT + bh * F * DV + of[:, None] * DV + ov[None, :],
        Sm + tl.where(evict, fk0[:, None] * v0[None, :], 0.0),
        mask=fmask[:, None] & vmask[None, :],
    )
    tl.store(Z_OUT + bh * F + of, z + tl.where(evict, fk0, 0.0), mask=fmask)


def step_constants(L: int, D: int, DV: int, F: int, window: int, terraced: bool, has_c: bool) -> dict:
    """The step kernel's compile-time constants (slots are read in tiles of at most 32)."""
    return dict(
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
    """q, k [B, H, D], v [B, H, Dv], fq, fk [B, H, F] (one token), a, b, c [H] fp32 (c may be None),
    real [B] bool. Returns y [B, H, Dv] (v's dtype) and the next state."""
    B, H, D = q.shape
    DV, F = v.shape[-1], fq.shape[-1]
    ks, vs, fks = (x.contiguous() for x in (state.k, state.v, state.fk))
    S, z = state.S.float().contiguous(), state.z.float().contiguous()
    y = v.new_empty(B, H, DV)
    outs = [torch.empty_like(x) for x in (ks, vs, fks, S, z)]
    has_c = c is not None
    token = [x.contiguous() for x in (q, k, v, fq, fk)]
    step_kernel[(B * H,)](
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
        y,
        *outs,
        H,
        scale,
        **step_constants(state.cached_tokens, D, DV, F, state.window, state.terraced, has_c),
    )
    return y, WindowHybridState(*outs, state.n + real.long(), state.window, state.terraced)
