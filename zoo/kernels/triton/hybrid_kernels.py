"""Triton kernels of the sliding-window + linear hybrid (the math of zoo.kernels.window_hybrid).

Heads. Query-side tensors (q, phi(q), y and the backward's per-query rows) have B * H head rows; keys,
values, key features and the linear states B * HKV (grouped-query attention, G = H / HKV query heads per
key/value head, `kv_row`), read in place, never repeated.

Layout. Keys live in an "extended" sequence of N = P + T rows per batch*head: P cached slots of a
WindowHybridState (P = 0 without a state) followed by the T new tokens; queries are the new tokens,
ext rows P .. N-1. Rows split into chunks (= tiles) of C. A row's absolute position is
n_b - P + e (n_b = tokens the state had seen), which only the terraced window needs; slot rows
e < P - min(n_b, P) are unused (zero) and masked out.

For the query at ext row e, the softmax window starts at row lo(e) (`window_start`); keys in
[lo(e), e] are softmax keys, older keys linear ones. Linear states are kept every state chunk of
SC = R * C rows (zoo.kernels.triton.chunk_states; SC >= 64 bounds their memory whatever the tile).
A query tile j (rows [jC, jC + C)) reads the keys of tiles kb_lo(j) .. j directly (the band: from
the state-chunk boundary at or before lo(jC), at most (span + SC) / C + 1 tiles, span = W - 1 plain,
2W - 1 terraced) with per-element window / linear / causal masks, and all keys before kb_lo(j)
through the linear state S, z at that boundary.

Forward (`fwd_kernel`), per query block: online max over the window (m_t and its argmax, as in
flash attention), window accumulators rescaled as m_t grows, linear accumulators not rescaled (the
hybrid compares linear weights with the max-normalized window weights, not with e^{q.k}):

    y_t = (a sum_win e^{s - m} v + sum_band coef w v + b phi_q S) / (a sum_win e^{s - m} + sum_band coef w + b
    phi_q z)

with w = phi_q . phi_k and coef = b outside the window, c inside (c = 0 unless given). It saves
m_t, the denominator and argmax_t for the backward pass. Attention sinks (SINKS > 0): the sinks' keys
and values [SINKS, *] per head row are extra softmax columns for the queries whose window does not hold
them (`sink_open_mask`), numbered N + i for argmax_t; the caller zeroes their key features, so they are
never linear keys. In the backward pass `bwd_dq_kernel` takes the sink columns' terms too (SINKS > 0),
writing each query tile's part of the sinks' dk, dv for the caller to sum; or the caller takes them in
PyTorch (SINKS = 0 there; zoo.kernels.triton.window_hybrid). m_t includes them either way.

Backward. With g = dL/dy, gn = g / den, gd = -(g . y) / den, each weight's gradient is
dW_ts = gn_t . v_s + gd_t. Softmax weights give ds_ts = a p_ts dW_ts, plus the max's own gradient
dm_t = -a sum_win p dW at the argmax key (added outside the kernels: a scatter). `bwd_dq_kernel`
(query-major) gives dq, dphi_q and the per-query parts of da, db, dc; `bwd_dkv_kernel` (key-major)
gives dk, dv, dphi_k: it reads the query tiles whose band holds its keys directly (up to the next
state-chunk boundary), and all later queries through the reverse ("dual") chunk states
G = sum b phi_q^T gn, Gz = sum b gd phi_q, summed over the query heads of its key/value head.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def window_start(e, shift, W: tl.constexpr, TERRACED: tl.constexpr):
    """First ext row inside the softmax window of the query at ext row e (may be negative).
    shift = n_b - P + 2W >= 0 turns ext rows into non-negative positions for the block arithmetic."""
    if TERRACED:
        start = ((e + shift) // W - 1) * W - shift
    else:
        start = e - W + 1
    return start


@triton.jit
def _band_masks(e_q, e_k, first_valid, N, shift, W: tl.constexpr, TERRACED: tl.constexpr):
    """(window, linear) masks for broadcastable query rows e_q and key rows e_k: causal real keys
    inside, resp. before, the query's window."""
    real = (e_k >= first_valid) & (e_k < N) & (e_k <= e_q)
    inside = e_k >= window_start(e_q, shift, W, TERRACED)
    return real & inside, real & (~inside)


@triton.jit
def _block_start(j, shift, C: tl.constexpr, R: tl.constexpr, W: tl.constexpr, TERRACED: tl.constexpr):
    """kb_lo(j): the first key tile in the band of query tile j, on a state-chunk boundary (R tiles
    per state chunk), so that the keys before it are exactly those of state chunks < kb_lo / R."""
    return tl.maximum(window_start(j * C, shift, W, TERRACED), 0) // (C * R) * R


@triton.jit
def _head_scalars(NSEEN, A, BB, CC, bh, H, P, W: tl.constexpr, HAS_C: tl.constexpr):
    """What every program of head row bh reads once: the first valid extended position, the window
    shift of its sequence, and the head's mixing factors a, b (and c, else 0)."""
    b_idx, h_idx = bh // H, bh % H
    n_b = tl.load(NSEEN + b_idx).to(tl.int32)
    fc = 0.0
    if HAS_C:
        fc = tl.load(CC + h_idx)
    return P - tl.minimum(n_b, P), n_b - P + 2 * W, tl.load(A + h_idx), tl.load(BB + h_idx), fc


@triton.jit
def kv_row(bh, H, G: tl.constexpr):
    """The key/value head row (b * H / G + h / G) that query head row bh = b * H + h reads: grouped-query
    attention keeps keys, values, key features and linear states once per group of G query heads."""
    return (bh // H) * (H // G) + (bh % H) // G


@triton.jit
def sink_open_mask(pos_q, i, SINKS: tl.constexpr, W: tl.constexpr, TERRACED: tl.constexpr):
    """Is sink i (a position < SINKS) an extra softmax key of the query at absolute position pos_q: at or
    before it and outside its window (a sink inside the window is one of the window's keys already)?"""
    if TERRACED:
        inside = (i // W) >= (pos_q // W) - 1
    else:
        inside = (pos_q - i) < W
    return (i < SINKS) & (i <= pos_q) & (~inside)


@triton.jit
def _sink_tile(
    SK,
    SV,
    kv,
    e_q,
    shift,
    D: tl.constexpr,
    DV: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    W: tl.constexpr,
    TERRACED: tl.constexpr,
    SINKS: tl.constexpr,
    BS: tl.constexpr,
):
    """The sinks of key/value head row kv: their indices [BS], keys [BS, BD], values [BS, BDV] (zero past
    SINKS) and which of them are extra softmax columns of the queries at ext rows e_q ([C, BS])."""
    osk, od, ov = tl.arange(0, BS), tl.arange(0, BD), tl.arange(0, BDV)
    sk = tl.load(
        SK + kv * SINKS * D + osk[:, None] * D + od[None, :],
        mask=(osk[:, None] < SINKS) & (od[None, :] < D),
        other=0.0,
    )
    sv = tl.load(
        SV + kv * SINKS * DV + osk[:, None] * DV + ov[None, :],
        mask=(osk[:, None] < SINKS) & (ov[None, :] < DV),
        other=0.0,
    )
    sink_on = sink_open_mask((e_q + shift - 2 * W)[:, None], osk[None, :], SINKS, W, TERRACED)
    return osk, sk, sv, sink_on


@triton.jit
def _online_softmax(s, v, m_i, arg, acc_win, l_win, offset, PREC: tl.constexpr):
    """Fold the masked scores s [C, n] (-inf outside) of keys with values v [n, DV] into the running max
    m_i (and its key's index arg, the keys numbered from `offset`), the max-normalized window sums."""
    blk_max = tl.max(s, 1)
    arg = tl.where(blk_max > m_i, tl.argmax(s, 1).to(tl.int64) + offset, arg)
    m_new = tl.maximum(m_i, blk_max)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no window key yet: nothing to rescale
    alpha = tl.exp(m_i - m_ref)
    p = tl.exp(s - m_ref[:, None])
    acc_win = acc_win * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    l_win = l_win * alpha + tl.sum(p, 1)
    return m_new, arg, acc_win, l_win


@triton.jit
def _query_tile(
    Q,
    FQ,
    bh,
    j,
    T,
    N,
    P,
    D: tl.constexpr,
    F: tl.constexpr,
    BD: tl.constexpr,
    BF: tl.constexpr,
    C: tl.constexpr,
):
    """Query tile j (extended positions e_q, new-token positions t_q, which are real) and its q, phi(q)."""
    od, of = tl.arange(0, BD), tl.arange(0, BF)
    e_q = j * C + tl.arange(0, C)
    t_q = e_q - P
    q_ok = (e_q >= P) & (e_q < N)
    q = tl.load(
        Q + bh * T * D + t_q[:, None] * D + od[None, :], mask=q_ok[:, None] & (od[None, :] < D), other=0.0
    )
    fq = tl.load(
        FQ + bh * T * F + t_q[:, None] * F + of[None, :], mask=q_ok[:, None] & (of[None, :] < F), other=0.0
    )
    return e_q, t_q, q_ok, q, fq


@triton.jit
def fwd_kernel(
    Q,
    FQ,
    K,
    V,
    FK,
    HS,
    HZ,
    NSEEN,
    A,
    BB,
    CC,
    SK,
    SV,
    Y,
    M,
    DEN,
    ARG,
    T,
    N,
    P,
    NC,
    NS,
    H,
    scale,
    D: tl.constexpr,
    DV: tl.constexpr,
    F: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    BF: tl.constexpr,
    FS: tl.constexpr,
    VS: tl.constexpr,
    C: tl.constexpr,
    R: tl.constexpr,
    W: tl.constexpr,
    TERRACED: tl.constexpr,
    HAS_C: tl.constexpr,
    PREC: tl.constexpr,
    SINKS: tl.constexpr,
    BS: tl.constexpr,
    G: tl.constexpr,
):
    j = tl.program_id(0) + P // C
    bh = tl.program_id(1).to(tl.int64)
    kv = kv_row(bh, H, G)
    first_valid, shift, fa, fb, fc = _head_scalars(NSEEN, A, BB, CC, bh, H, P, W, HAS_C)

    od, ov, of = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BF)
    e_q, t_q, q_ok, q, fq = _query_tile(Q, FQ, bh, j, T, N, P, D, F, BD, BF, C)

    m_i = tl.full([C], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([C], dtype=tl.int64)
    l_win = tl.zeros([C], dtype=tl.float32)
    l_lin = tl.zeros([C], dtype=tl.float32)
    acc_win = tl.zeros([C, BDV], dtype=tl.float32)
    acc_lin = tl.zeros([C, BDV], dtype=tl.float32)
    kb_lo = _block_start(j, shift, C, R, W, TERRACED)
    for kb in range(kb_lo, j + 1):
        e_k = kb * C + tl.arange(0, C)
        k_in = e_k < N
        k = tl.load(
            K + kv * N * D + e_k[:, None] * D + od[None, :], mask=k_in[:, None] & (od[None, :] < D), other=0.0
        )
        v = tl.load(
            V + kv * N * DV + e_k[:, None] * DV + ov[None, :],
            mask=k_in[:, None] & (ov[None, :] < DV),
            other=0.0,
        )
        fk = tl.load(
            FK + kv * N * F + e_k[:, None] * F + of[None, :],
            mask=k_in[:, None] & (of[None, :] < F),
            other=0.0,
        )
        win, lin = _band_masks(e_q[:, None], e_k[None, :], first_valid, N, shift, W, TERRACED)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        s = tl.where(win, s, float("-inf"))
        m_i, arg, acc_win, l_win = _online_softmax(s, v, m_i, arg, acc_win, l_win, kb * C, PREC)
        coef = tl.where(lin, fb, 0.0)
        if HAS_C:
            coef += tl.where(win, fc, 0.0)
        lw = tl.dot(fq, tl.trans(fk), input_precision=PREC) * coef
        acc_lin += tl.dot(lw.to(v.dtype), v, input_precision=PREC)
        l_lin += tl.sum(lw, 1)

    if SINKS > 0:  # the sinks outside each query's window: extra softmax columns, numbered N + i
        osk, sk, sv, sink_on = _sink_tile(SK, SV, kv, e_q, shift, D, DV, BD, BDV, W, TERRACED, SINKS, BS)
        s = tl.where(sink_on, tl.dot(q, tl.trans(sk), input_precision=PREC) * scale, float("-inf"))
        m_i, arg, acc_win, l_win = _online_softmax(s, sv, m_i, arg, acc_win, l_win, N, PREC)

    # keys before the band: the linear state at kb_lo, in slices of FS features (a whole [F, Dv] state
    # tile would not fit in shared memory for large F)
    st = kv * (NS + 1) + kb_lo // R
    for f0 in range(0, BF, FS):
        ofs = f0 + tl.arange(0, FS)
        fq_s = tl.load(
            FQ + bh * T * F + t_q[:, None] * F + ofs[None, :],
            mask=q_ok[:, None] & (ofs[None, :] < F),
            other=0.0,
        ).to(tl.float32)
        S = tl.load(
            HS + st * F * DV + ofs[:, None] * DV + ov[None, :],
            mask=(ofs[:, None] < F) & (ov[None, :] < DV),
            other=0.0,
        )
        z = tl.load(HZ + st * F + ofs, mask=ofs < F, other=0.0)
        acc_lin += fb * tl.dot(fq_s, S, input_precision=PREC)
        l_lin += fb * tl.sum(fq_s * z[None, :], 1)

    den = fa * l_win + l_lin
    den = tl.where(q_ok, den, 1.0)
    y = (fa * acc_win + acc_lin) / den[:, None]
    tl.store(
        Y + bh * T * DV + t_q[:, None] * DV + ov[None, :],
        y.to(Y.dtype.element_ty),
        mask=q_ok[:, None] & (ov[None, :] < DV),
    )
    tl.store(M + bh * T + t_q, tl.where(m_i == float("-inf"), 0.0, m_i), mask=q_ok)
    tl.store(DEN + bh * T + t_q, den, mask=q_ok)
    tl.store(ARG + bh * T + t_q, arg, mask=q_ok)


@triton.jit
def bwd_dq_kernel(
    Q,
    FQ,
    K,
    V,
    FK,
    HS,
    HZ,
    NSEEN,
    A,
    BB,
    CC,
    GN,
    GD,
    M,
    DQ,
    DFQ,
    PA,
    PB,
    PC,
    SK,
    SV,
    DSK,
    DSV,
    T,
    N,
    P,
    NC,
    NS,
    H,
    scale,
    D: tl.constexpr,
    DV: tl.constexpr,
    F: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    BF: tl.constexpr,
    FS: tl.constexpr,
    VS: tl.constexpr,
    C: tl.constexpr,
    R: tl.constexpr,
    W: tl.constexpr,
    TERRACED: tl.constexpr,
    HAS_C: tl.constexpr,
    PREC: tl.constexpr,
    G: tl.constexpr,
    SINKS: tl.constexpr,
    BS: tl.constexpr,
):
    j = tl.program_id(0) + P // C
    bh = tl.program_id(1).to(tl.int64)
    kv = kv_row(bh, H, G)
    first_valid, shift, fa, fb, fc = _head_scalars(NSEEN, A, BB, CC, bh, H, P, W, HAS_C)

    od, ov, of = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BF)
    e_q, t_q, q_ok, q, fq = _query_tile(Q, FQ, bh, j, T, N, P, D, F, BD, BF, C)
    gn = tl.load(
        GN + bh * T * DV + t_q[:, None] * DV + ov[None, :], mask=q_ok[:, None] & (ov[None, :] < DV), other=0.0
    )
    gd = tl.load(GD + bh * T + t_q, mask=q_ok, other=0.0)
    m = tl.load(M + bh * T + t_q, mask=q_ok, other=0.0)

    acc_dq = tl.zeros([C, BD], dtype=tl.float32)
    acc_dfq = tl.zeros([C, BF], dtype=tl.float32)
    pa = tl.zeros([C], dtype=tl.float32)
    pb = tl.zeros([C], dtype=tl.float32)
    pc = tl.zeros([C], dtype=tl.float32)
    kb_lo = _block_start(j, shift, C, R, W, TERRACED)
    for kb in range(kb_lo, j + 1):
        e_k = kb * C + tl.arange(0, C)
        k_in = e_k < N
        k = tl.load(
            K + kv * N * D + e_k[:, None] * D + od[None, :], mask=k_in[:, None] & (od[None, :] < D), other=0.0
        )
        v = tl.load(
            V + kv * N * DV + e_k[:, None] * DV + ov[None, :],
            mask=k_in[:, None] & (ov[None, :] < DV),
            other=0.0,
        ).to(tl.float32)
        fk = tl.load(
            FK + kv * N * F + e_k[:, None] * F + of[None, :],
            mask=k_in[:, None] & (of[None, :] < F),
            other=0.0,
        )
        win, lin = _band_masks(e_q[:, None], e_k[None, :], first_valid, N, shift, W, TERRACED)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        p = tl.exp(tl.where(win, s, float("-inf")) - m[:, None])
        dw = tl.dot(gn, tl.trans(v), input_precision=PREC) + gd[:, None]
        pdw = p * dw
        pa += tl.sum(pdw, 1)
        acc_dq += tl.dot((fa * pdw).to(k.dtype), k, input_precision=PREC)
        lw = tl.dot(fq, tl.trans(fk), input_precision=PREC)
        coef = tl.where(lin, fb, 0.0)
        pb += tl.sum(tl.where(lin, lw * dw, 0.0), 1)
        if HAS_C:
            coef += tl.where(win, fc, 0.0)
            pc += tl.sum(tl.where(win, lw * dw, 0.0), 1)
        acc_dfq += tl.dot((dw * coef).to(fk.dtype), fk, input_precision=PREC)

    # keys before the band, through the state at kb_lo (in slices of VS value columns)
    st = kv * (NS + 1) + kb_lo // R
    fq32 = fq.to(tl.float32)
    for v0 in range(0, BDV, VS):
        ovs = v0 + tl.arange(0, VS)
        gn_s = tl.load(
            GN + bh * T * DV + t_q[:, None] * DV + ovs[None, :],
            mask=q_ok[:, None] & (ovs[None, :] < DV),
            other=0.0,
        )
        S = tl.load(
            HS + st * F * DV + of[:, None] * DV + ovs[None, :],
            mask=(of[:, None] < F) & (ovs[None, :] < DV),
            other=0.0,
        )
        g_s = tl.dot(gn_s, tl.trans(S), input_precision=PREC)  # [C, BF]: the far keys' dW, summed through S
        acc_dfq += fb * g_s
        pb += tl.sum(fq32 * g_s, 1)
    z = tl.load(HZ + st * F + of, mask=of < F, other=0.0)
    acc_dfq += fb * gd[:, None] * z[None, :]
    pb += gd * tl.sum(fq32 * z[None, :], 1)

    if SINKS > 0:  # the sinks outside each query's window (softmax columns, as in the forward pass)
        osk, sk, sv, sink_on = _sink_tile(SK, SV, kv, e_q, shift, D, DV, BD, BDV, W, TERRACED, SINKS, BS)
        sv = sv.to(tl.float32)
        sink_on = sink_on & q_ok[:, None]
        s = tl.dot(q, tl.trans(sk), input_precision=PREC) * scale
        p = tl.exp(tl.where(sink_on, s, float("-inf")) - m[:, None])  # [C, BS]
        pdw = p * (tl.dot(gn, tl.trans(sv), input_precision=PREC) + gd[:, None])
        pa += tl.sum(pdw, 1)
        acc_dq += tl.dot((fa * pdw).to(sk.dtype), sk, input_precision=PREC)
        # this query tile's part of the sinks' dk, dv: summed over tiles and heads by the caller
        part = bh * tl.num_programs(0) + tl.program_id(0)
        dsk = tl.dot(tl.trans((fa * scale) * pdw).to(q.dtype), q, input_precision=PREC)  # [BS, BD]
        dsv = tl.dot(tl.trans(fa * p), gn, input_precision=PREC)  # [BS, BDV]
        s_ok = osk[:, None] < SINKS
        tl.store(DSK + part * SINKS * D + osk[:, None] * D + od[None, :], dsk, mask=s_ok & (od[None, :] < D))
        tl.store(
            DSV + part * SINKS * DV + osk[:, None] * DV + ov[None, :], dsv, mask=s_ok & (ov[None, :] < DV)
        )

    qmask = q_ok[:, None]
    tl.store(DQ + bh * T * D + t_q[:, None] * D + od[None, :], acc_dq * scale, mask=qmask & (od[None, :] < D))
    tl.store(DFQ + bh * T * F + t_q[:, None] * F + of[None, :], acc_dfq, mask=qmask & (of[None, :] < F))
    tl.store(PA + bh * T + t_q, pa, mask=q_ok)
    tl.store(PB + bh * T + t_q, pb, mask=q_ok)
    if HAS_C:
        tl.store(PC + bh * T + t_q, pc, mask=q_ok)


@triton.jit
def bwd_dkv_kernel(
    Q,
    FQ,
    K,
    V,
    FK,
    GS,
    GZ,
    NSEEN,
    A,
    BB,
    CC,
    GN,
    GD,
    M,
    DK,
    DVAL,
    DFK,
    T,
    N,
    P,
    NC,
    NS,
    H,
    scale,
    D: tl.constexpr,
    DV: tl.constexpr,
    F: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    BF: tl.constexpr,
    FS: tl.constexpr,
    VS: tl.constexpr,
    C: tl.constexpr,
    R: tl.constexpr,
    W: tl.constexpr,
    TERRACED: tl.constexpr,
    HAS_C: tl.constexpr,
    NJ: tl.constexpr,
    PREC: tl.constexpr,
    G: tl.constexpr,
):
    c = tl.program_id(0)
    kv = tl.program_id(1).to(tl.int64)
    HKV = H // G
    bh0 = (kv // HKV) * H + (kv % HKV) * G  # the first query head row of this key/value head
    first_valid, shift, fa, fb, fc = _head_scalars(NSEEN, A, BB, CC, bh0, H, P, W, HAS_C)

    od, ov, of = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BF)
    e_k = c * C + tl.arange(0, C)
    k_in = e_k < N
    k = tl.load(
        K + kv * N * D + e_k[:, None] * D + od[None, :], mask=k_in[:, None] & (od[None, :] < D), other=0.0
    )
    v = tl.load(
        V + kv * N * DV + e_k[:, None] * DV + ov[None, :], mask=k_in[:, None] & (ov[None, :] < DV), other=0.0
    ).to(tl.float32)
    fk = tl.load(
        FK + kv * N * F + e_k[:, None] * F + of[None, :], mask=k_in[:, None] & (of[None, :] < F), other=0.0
    )

    acc_dk = tl.zeros([C, BD], dtype=tl.float32)
    acc_dv = tl.zeros([C, BDV], dtype=tl.float32)
    acc_dfk = tl.zeros([C, BF], dtype=tl.float32)
    # the query tiles whose band holds this key tile: c .. j_star - 1 (at most NJ of them) ...
    n_band = c * 0
    for i in range(NJ):
        n_band += ((c + i < NC) & (_block_start(c + i, shift, C, R, W, TERRACED) <= c)).to(tl.int32)
    # ... read directly up to a state-chunk boundary (this key tile is all "linear" to the extra ones),
    # the later ones through the dual state of that chunk; for each query head of the group in turn
    j_end = tl.cdiv(c + n_band, R) * R
    for g in range(G):
        bh = bh0 + g
        fa, fb = tl.load(A + g + bh0 % H), tl.load(BB + g + bh0 % H)  # this query head's factors
        if HAS_C:
            fc = tl.load(CC + g + bh0 % H)
        for j in range(c, tl.minimum(j_end, NC)):
            e_q, t_q, q_ok, q, fq = _query_tile(Q, FQ, bh, j, T, N, P, D, F, BD, BF, C)
            gn = tl.load(
                GN + bh * T * DV + t_q[:, None] * DV + ov[None, :],
                mask=q_ok[:, None] & (ov[None, :] < DV),
                other=0.0,
            )
            gd = tl.load(GD + bh * T + t_q, mask=q_ok, other=0.0)
            m = tl.load(M + bh * T + t_q, mask=q_ok, other=0.0)
            # everything transposed: rows are keys, columns queries
            win, lin = _band_masks(e_q[None, :], e_k[:, None], first_valid, N, shift, W, TERRACED)
            s = tl.dot(k, tl.trans(q), input_precision=PREC) * scale
            p = tl.exp(tl.where(win, s, float("-inf")) - m[None, :])
            dw = tl.dot(v, tl.trans(gn), input_precision=PREC) + gd[None, :]
            coef = tl.where(lin, fb, 0.0)
            if HAS_C:
                coef += tl.where(win, fc, 0.0)
            lw = tl.dot(fk, tl.trans(fq), input_precision=PREC) * coef
            acc_dv += tl.dot(fa * p + lw, gn, input_precision=PREC)
            acc_dk += tl.dot((fa * p * dw).to(q.dtype), q, input_precision=PREC)
            acc_dfk += tl.dot((dw * coef).to(fq.dtype), fq, input_precision=PREC)

    # later queries, through the dual state at j_end: the group's query heads summed, each times its b
    # (zoo.kernels.triton.chunk_states with groups), in slices as in the forward pass
    st = kv * (NS + 1) + j_end // R
    g_ptr = GS + st * F * DV
    for v0 in range(0, BDV, VS):
        ovs = v0 + tl.arange(0, VS)
        v_s = tl.load(
            V + kv * N * DV + e_k[:, None] * DV + ovs[None, :],
            mask=k_in[:, None] & (ovs[None, :] < DV),
            other=0.0,
        ).to(tl.float32)
        Gs = tl.load(
            g_ptr + of[:, None] * DV + ovs[None, :],
            mask=(of[:, None] < F) & (ovs[None, :] < DV),
            other=0.0,
        )
        acc_dfk += tl.dot(v_s, tl.trans(Gs), input_precision=PREC)
    for f0 in range(0, BF, FS):
        ofs = f0 + tl.arange(0, FS)
        fk_s = tl.load(
            FK + kv * N * F + e_k[:, None] * F + ofs[None, :],
            mask=k_in[:, None] & (ofs[None, :] < F),
            other=0.0,
        ).to(tl.float32)
        Gs = tl.load(
            g_ptr + ofs[:, None] * DV + ov[None, :],
            mask=(ofs[:, None] < F) & (ov[None, :] < DV),
            other=0.0,
        )
        acc_dv += tl.dot(fk_s, Gs, input_precision=PREC)
    gz = tl.load(GZ + st * F + of, mask=of < F, other=0.0)
    acc_dfk += gz[None, :]

    k_ok = (k_in & (e_k >= first_valid))[:, None]
    tl.store(
        DK + kv * N * D + e_k[:, None] * D + od[None, :],
        tl.where(k_ok, acc_dk * scale, 0.0),
        mask=k_in[:, None] & (od[None, :] < D),
    )
    tl.store(
        DVAL + kv * N * DV + e_k[:, None] * DV + ov[None, :],
        tl.where(k_ok, acc_dv, 0.0),
        mask=k_in[:, None] & (ov[None, :] < DV),
    )
    tl.store(
        DFK + kv * N * F + e_k[:, None] * F + of[None, :],
        tl.where(k_ok, acc_dfk, 0.0),
        mask=k_in[:, None] & (of[None, :] < F),
    )
