"""Linear-attention states at chunk boundaries: prefix (or suffix) sums of per-chunk outer products.

For rows e = 0 .. N-1 split into chunks of C, with X [BH, N - off, F] (row e reads X[e - off], rows
e < off read zeros), Y [BH, N - off, Dv] and optional row weights w [BH, N - off] (default 1):

    forward:  S[c] = S0 + sum_{e < c*C} X_e^T Y_e,     z[c] = z0 + sum_{e < c*C} w_e X_e      c = 0 .. NC
    reverse:  S[c] = sum_{e >= c*C} X_e^T Y_e,         z[c] = sum_{e >= c*C} w_e X_e          (S[NC] = 0)

Returned as S [BH, NC + 1, F, Dv] and z [BH, NC + 1, F], fp32. The hybrid's forward pass reads the
state of the keys that lie before a query block's band (X = phi(k), Y = v); its backward pass reads
the matching "dual" state of the queries after a key block's band (X = phi(q), Y = dy / den, w = the
normalizer's gradient). One program per (output row, F tile, Dv tile) walks the chunks in order.

Groups (`group` = G > 1): the rows come in groups of G consecutive ones (the query heads of one
key/value head), and output row r is the sum over its group of the rows' states, each times its head's
factor s_h (h = the row's index mod `heads`): S_r[c] = sum_g s_h(g) S_{rG+g}[c]. The backward pass
needs only that sum, G times smaller than the per-row states.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: the largest [F, Dv] tile of one program: 32 ran the window hybrid's forward + backward 6% faster than
#: 64 on an H200 at 16k tokens (docs/gpu-check/2026-12-04-h200-tuning, run 3)
STATE_TILE = 32


@triton.jit
def chunk_states_kernel(
    X,
    Y,
    WT,
    S0,
    Z0,
    S_OUT,
    Z_OUT,
    SCALE,
    N,
    OFF,
    NC,
    HEADS,
    F: tl.constexpr,
    DV: tl.constexpr,
    BF: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_INIT: tl.constexpr,
    REVERSE: tl.constexpr,
    PREC: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)  # the output row (a group of GROUP input rows)
    i_f, i_v = tl.program_id(1), tl.program_id(2)
    of = i_f * BF + tl.arange(0, BF)
    ov = i_v * BV + tl.arange(0, BV)
    fmask, vmask = of < F, ov < DV
    rows_x = N - OFF
    acc = tl.zeros([BF, BV], dtype=tl.float32)
    accz = tl.zeros([BF], dtype=tl.float32)
    if HAS_INIT:
        acc += tl.load(
            S0 + bh * F * DV + of[:, None] * DV + ov[None, :], mask=fmask[:, None] & vmask[None, :], other=0.0
        )
        accz += tl.load(Z0 + bh * F + of, mask=fmask, other=0.0)
    s_base = S_OUT + bh * (NC + 1) * F * DV + of[:, None] * DV + ov[None, :]
    z_base = Z_OUT + bh * (NC + 1) * F + of
    smask = fmask[:, None] & vmask[None, :]
    zmask = fmask & ((of * 0 + i_v) == 0)  # z once per F tile
    if REVERSE:
        tl.store(s_base + NC * F * DV, acc, mask=smask)
        tl.store(z_base + NC * F, accz, mask=zmask)
    for i in range(NC):
        c = i
        if REVERSE:
            c = NC - 1 - i
        else:
            tl.store(s_base + c * F * DV, acc, mask=smask)
            tl.store(z_base + c * F, accz, mask=zmask)
        r = c * C + tl.arange(0, C) - OFF
        rmask = (r >= 0) & (r < rows_x)
        for g in range(GROUP):
            row = bh * GROUP + g
            x = tl.load(
                X + row * rows_x * F + r[:, None] * F + of[None, :],
                mask=rmask[:, None] & fmask[None, :],
                other=0.0,
            ).to(tl.float32)
            y = tl.load(
                Y + row * rows_x * DV + r[:, None] * DV + ov[None, :],
                mask=rmask[:, None] & vmask[None, :],
                other=0.0,
            ).to(tl.float32)
            if HAS_W:
                w = tl.load(WT + row * rows_x + r, mask=rmask, other=0.0).to(tl.float32)
            else:
                w = tl.where(rmask, 1.0, 0.0)
            if HAS_SCALE:
                head_scale = tl.load(SCALE + row % HEADS)
                y = y * head_scale
                w = w * head_scale
            acc += tl.dot(tl.trans(x), y, input_precision=PREC)
            accz += tl.sum(x * w[:, None], 0)
        if REVERSE:
            tl.store(s_base + c * F * DV, acc, mask=smask)
            tl.store(z_base + c * F, accz, mask=zmask)
    if not REVERSE:
        tl.store(s_base + NC * F * DV, acc, mask=smask)
        tl.store(z_base + NC * F, accz, mask=zmask)


def pow2_block(n: int, lo: int = 16, hi: int | None = None) -> int:
    """The power of two >= max(n, lo) (tl.dot wants tiles of at least 16), capped at hi."""
    b = max(triton.next_power_of_2(n), lo)
    return b if hi is None else min(b, hi)


def chunk_states(
    x: torch.Tensor,
    y: torch.Tensor,
    n_rows: int,
    chunk: int,
    *,
    offset: int = 0,
    weights: torch.Tensor | None = None,
    s0: torch.Tensor | None = None,
    z0: torch.Tensor | None = None,
    reverse: bool = False,
    precision: str = "ieee",
    tile: int = STATE_TILE,
    num_stages: int | None = None,
    group: int = 1,
    head_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [BH, n_rows - offset, F], y [BH, n_rows - offset, Dv] (contiguous), weights [BH, n_rows - offset]
    or None, s0 [BH, F, Dv] / z0 [BH, F] fp32 or None (forward only). Returns (S [BH, NC+1, F, Dv],
    z [BH, NC+1, F]) fp32, NC = ceil(n_rows / chunk); see the module docstring. `tile`: the largest
    [F, Dv] state tile one program keeps (a power of two >= 16: smaller ones give more programs);
    `num_stages`: Triton's software pipelining of the loop over chunks (None: Triton's default).
    `group` G: sum the states of each G consecutive rows, each times `head_scale` [H] (fp32) of its head
    (row index mod H), or 1; returns [BH / G, ...] (see the module docstring)."""
    BH, _, F = x.shape
    DV = y.shape[-1]
    if group < 1 or BH % group:
        raise ValueError(f"group ({group}) must divide the rows ({BH})")
    rows_out = BH // group
    NC = triton.cdiv(n_rows, chunk)
    S = x.new_empty(rows_out, NC + 1, F, DV, dtype=torch.float32)
    Z = x.new_empty(rows_out, NC + 1, F, dtype=torch.float32)
    has_init = s0 is not None
    has_scale = head_scale is not None
    const = chunk_state_constants(
        F, DV, chunk, weights is not None, has_init, reverse, precision, tile, group, has_scale
    )
    grid = (rows_out, triton.cdiv(F, const["BF"]), triton.cdiv(DV, const["BV"]))
    chunk_states_kernel[grid](
        x,
        y,
        weights if weights is not None else x,
        s0 if has_init else S,
        z0 if has_init else Z,
        S,
        Z,
        head_scale if has_scale else x,
        n_rows,
        offset,
        NC,
        head_scale.shape[0] if has_scale else 1,
        **const,
        **({} if num_stages is None else dict(num_stages=num_stages)),
    )
    return S, Z


def chunk_state_constants(
    F: int,
    DV: int,
    chunk: int,
    has_weights: bool,
    has_init: bool,
    reverse: bool,
    precision: str,
    tile: int = STATE_TILE,
    group: int = 1,
    has_scale: bool = False,
) -> dict:
    """The kernel's compile-time constants: [F, Dv] state tiles of at most tile x tile per program,
    groups of `group` rows summed (each times its head's factor with has_scale)."""
    return dict(
        F=F,
        DV=DV,
        BF=pow2_block(F, hi=tile),
        BV=pow2_block(DV, hi=tile),
        C=chunk,
        HAS_W=has_weights,
        HAS_INIT=has_init,
        REVERSE=reverse,
        PREC=precision,
        GROUP=group,
        HAS_SCALE=has_scale,
    )
