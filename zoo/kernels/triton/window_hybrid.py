"""The window hybrid (LoLCATs) on Triton: training / prefill with autograd, and the decoding step.

`window_hybrid_triton` and `window_hybrid_step_triton` take the arguments of
zoo.kernels.window_hybrid.window_hybrid_chunked / _step and return y [B, H, T, Dv] (q's dtype) and the
next WindowHybridState, interchangeable with the PyTorch forms' states. Differentiable in q, k, v, fq,
fk, a, b, c and the incoming state (the step form is for inference: no autograd). Beyond those forms:
k, v and fk may have fewer heads than q (HKV dividing H: grouped-query attention, query head h reading
key/value head h // (H / HKV)), and the state then has HKV heads. `sinks` as in the PyTorch forms.

Limits (the dispatcher routes these to the PyTorch forms): no padding (key_mask must be all ones, or
None) in the chunked form; a window of at least 1; dtypes float32, bfloat16, float16. The kernels are
in hybrid_kernels.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import triton

from zoo.kernels.triton.chunk_states import STATE_TILE, chunk_states, pow2_block
from zoo.kernels.triton.hybrid_kernels import bwd_dkv_kernel, bwd_dq_kernel, fwd_kernel
from zoo.kernels.triton.hybrid_step import step_one_token
from zoo.kernels.window_hybrid import (
    WindowHybridState,
    drop_sink_features,
    sink_open,
    updated_sink_slots,
)
from zoo.kernels.window_state import advance_state, extend_with_state

#: linear states are kept every this many rows (at least; a multiple of the tile)
STATE_CHUNK = 64
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact fp32 products unless torch allows TF32 matmuls; lower precisions: TF32 for the
    fp32 operands the kernels form (already below the inputs' own precision)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def _small_heads(D: int, DV: int, F: int) -> bool:
    return max(D, DV) <= 64 and F <= 128


#: shared memory per block (bytes, opt-in) a GPU needs for 64-row tiles at large heads: their backward
#: kernels take up to 212,992 bytes (bwd_dq with sinks, sm_90 build), which Hopper (232,448) has and
#: sm_80 (166,912) / sm_86-89 (101,376) do not
BIG_TILE_SHARED = 215_000


def tile_rows(
    D: int, DV: int, F: int, dtype: torch.dtype = torch.float32, shared_bytes: int | None = None
) -> int:
    """Query / key tile (rows) for head sizes D, DV, F features, inputs of `dtype`, on a GPU with
    `shared_bytes` of shared memory per block (None: unknown). Small heads (D = DV = 64, F = 128): 32 rows
    (ptxas: no register spills on sm_90). Large heads (D = DV = 128, F = 256) in 16-bit: 64 rows where
    they fit (`BIG_TILE_SHARED`), else 32: on an H200 the fastest forward + backward of the settings
    timed (docs/gpu-check/2026-12-04-h200-tuning, runs 1-4), with `launch_options`, bf16 features and the
    sinks' backward in the kernel: 16.3 ms at 16k tokens against 18.3 for 32 rows and 28.6 for the old
    16 rows, 8 warps, fp32 features. Large heads in fp32: 16 rows (not timed)."""
    if _small_heads(D, DV, F):
        return 32
    if not _half(dtype):
        return 16
    return 64 if shared_bytes is not None and shared_bytes >= BIG_TILE_SHARED else 32


def chosen_tile(
    D: int, DV: int, F: int, dtype: torch.dtype = torch.float32, shared_bytes: int | None = None
) -> int:
    """The tile the kernels run with: `launch_config`'s, else `tile_rows`."""
    return _LAUNCH.get("tile") or tile_rows(D, DV, F, dtype, shared_bytes)


@functools.cache
def _shared_bytes_of(index: int) -> int | None:
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", None)


def device_shared_bytes(device: torch.device) -> int | None:
    """Shared memory per block (bytes, opt-in) of a CUDA device; None elsewhere or where torch does not
    say."""
    if device.type != "cuda":
        return None
    return _shared_bytes_of(device.index if device.index is not None else torch.cuda.current_device())


def feature_dtype(q_dtype: torch.dtype, fq_dtype: torch.dtype, fk_dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels read phi(q), phi(k) in: `launch_config`'s; else that of 16-bit inputs (the
    feature maps give fp32, and reading them in bf16 made forward + backward 1.1x faster on an H200, at
    3e-3 relative error in their gradients against an fp32 reference, below that of the output); else
    the features' own."""
    chosen = _LAUNCH.get("feature_dtype")
    if chosen is not None:
        return chosen
    return q_dtype if _half(q_dtype) else torch.promote_types(fq_dtype, fk_dtype)


def launch_options(
    D: int,
    DV: int,
    F: int,
    dtype: torch.dtype = torch.float32,
    backward: bool = False,
    tile: int | None = None,
) -> dict:
    """num_warps / num_stages for the hybrid's forward kernel, or its backward kernels, at `tile` rows
    (`launch_config` overrides both). 8 warps; 1 stage for 64-row tiles and for large heads in fp32, else
    2 (timed on an H200 for large heads in 16-bit; the rest not timed, no spills for small heads)."""
    stages = 1 if (tile or 0) >= 64 or not (_small_heads(D, DV, F) or _half(dtype)) else 2
    options = dict(num_warps=8, num_stages=stages)
    for key in ("num_warps", "num_stages"):
        chosen = _LAUNCH.get(("bwd_" if backward else "") + key) or _LAUNCH.get(key)
        if chosen:
            options[key] = chosen
    return options


#: launch settings `launch_config` puts in place of the defaults (None: the default)
_LAUNCH: dict = {}
_LAUNCH_KEYS = (
    "tile",
    "num_warps",
    "num_stages",
    "bwd_num_warps",
    "bwd_num_stages",
    "feature_dtype",
    "state_chunk",
    "state_tile",
    "state_stages",
    "sink_backward",
)


@contextlib.contextmanager
def launch_config(**settings):
    """Run the window hybrid's Triton kernels with other launch settings inside the block (for tuning:
    zoo.kernels.triton.tune): `tile` (query / key rows, a power of two >= 16, in place of `tile_rows`),
    `num_warps`, `num_stages` (every kernel) and `bwd_num_warps`, `bwd_num_stages` (the backward
    kernels), `feature_dtype` (the dtype the kernels read phi(q), phi(k) in; default: `feature_dtype`),
    `state_chunk` (rows between stored linear states), `state_tile` and `state_stages` (the largest
    [F, Dv] tile of one program of zoo.kernels.triton.chunk_states, and its pipelining),
    `sink_backward` (one of SINK_BACKWARDS: how the sink columns' backward products run). None leaves a
    setting at its default; explicit chunk_size= and state_chunk= arguments still win."""
    unknown = sorted(set(settings) - set(_LAUNCH_KEYS))
    if unknown:
        raise ValueError(f"launch_config takes {', '.join(_LAUNCH_KEYS)}; got {', '.join(unknown)}")
    old = dict(_LAUNCH)
    _LAUNCH.update({k: v for k, v in settings.items() if v is not None})
    try:
        yield
    finally:
        _LAUNCH.clear()
        _LAUNCH.update(old)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[2:]).contiguous()


class Dims:
    """Sizes and launch constants shared by the forward and backward launches."""

    def __init__(self, q, k, v, fq, window, terraced, scale, block, state_chunk, prefix):
        self.B, self.H, self.T, self.D = q.shape
        self.N, self.DV, self.F = k.shape[2], v.shape[-1], fq.shape[-1]
        self.HKV, self.G = k.shape[1], self.H // k.shape[1]  # key/value heads, query heads per group
        self.C, self.SC, self.P, self.scale = block, state_chunk, prefix, scale
        self.NC, self.NS = triton.cdiv(self.N, block), triton.cdiv(self.N, state_chunk)
        span = (2 * window if terraced else window) - 1
        self.const = dict(
            D=self.D,
            DV=self.DV,
            F=self.F,
            BD=pow2_block(self.D),
            BDV=pow2_block(self.DV),
            BF=pow2_block(self.F),
            FS=pow2_block(self.F, hi=32),
            VS=pow2_block(self.DV, hi=32),
            C=block,
            R=state_chunk // block,
            W=window,
            TERRACED=terraced,
            PREC=dot_precision(q.dtype),
            G=self.G,
            **launch_options(self.D, self.DV, self.F, q.dtype, tile=block),
        )
        self.bwd_const = dict(
            self.const, **launch_options(self.D, self.DV, self.F, q.dtype, backward=True, tile=block)
        )
        self.sink_backward = _LAUNCH.get("sink_backward") or "kernel"
        if self.sink_backward not in SINK_BACKWARDS:
            raise ValueError(f"sink_backward must be one of {SINK_BACKWARDS}, got {self.sink_backward!r}")
        self.state_options = dict(
            precision=self.const["PREC"],
            tile=_LAUNCH.get("state_tile") or STATE_TILE,
            num_stages=_LAUNCH.get("state_stages"),
        )
        self.NJ = (
            triton.cdiv(span + state_chunk, block) + 1
        )  # bound on the query tiles whose band holds a key tile

    @property
    def query_grid(self):
        return (self.NC - self.P // self.C, self.B * self.H)

    def sizes(self):
        return self.T, self.N, self.P, self.NC, self.NS, self.H, self.scale

    def kv_rows(self, device) -> torch.Tensor:
        """[B * H]: the key/value head row of each query head row (as hybrid_kernels.kv_row)."""
        rows = torch.arange(self.B * self.H, device=device)
        return (rows // self.H) * self.HKV + (rows % self.H) // self.G

    def per_kv_head(self, x: torch.Tensor) -> torch.Tensor:
        """[B * H, *] per query head row -> [B * HKV, *]: each group's rows summed."""
        return x.reshape(self.B * self.HKV, self.G, *x.shape[1:]).sum(1)


class _WindowHybridFn(torch.autograd.Function):
    """y from q, fq [B, H, T, *] and the extended k, v, fk [B, HKV, P + T, *] (HKV divides H: grouped-query
    attention, the groups' keys never repeated); see hybrid_kernels.py."""

    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        fq,
        fk,
        a,
        b,
        c,
        sink_k,
        sink_v,
        S0,
        z0,
        n_seen,
        prefix,
        window,
        terraced,
        scale,
        block,
        state_chunk,
    ):
        dims = Dims(q, k, v, fq, window, terraced, scale, block, state_chunk, prefix)
        BH, T = dims.B * dims.H, dims.T
        q_, k_, v_, fq_, fk_ = (_flat(x) for x in (q, k, v, fq, fk))
        sinks = 0 if sink_k is None else sink_k.shape[2]
        sk_, sv_ = (q_, q_) if sinks == 0 else (_flat(sink_k.to(q.dtype)), _flat(sink_v.to(v.dtype)))
        s0_, z0_ = _flat(S0.float()), _flat(z0.float())
        HS, HZ = chunk_states(fk_, v_, dims.N, state_chunk, s0=s0_, z0=z0_, **dims.state_options)
        y = q.new_empty(BH, T, dims.DV)
        m = q.new_empty(BH, T, dtype=torch.float32)
        den = torch.empty_like(m)
        arg = torch.empty(BH, T, dtype=torch.long, device=q.device)
        has_c = c is not None
        fwd_kernel[dims.query_grid](
            q_,
            fq_,
            k_,
            v_,
            fk_,
            HS,
            HZ,
            n_seen,
            a,
            b,
            c if has_c else a,
            sk_,
            sv_,
            y,
            m,
            den,
            arg,
            *dims.sizes(),
            HAS_C=has_c,
            SINKS=sinks,
            BS=pow2_block(max(sinks, 1)),
            **dims.const,
        )
        ctx.save_for_backward(
            q_, k_, v_, fq_, fk_, a, b, c if has_c else None, s0_, z0_, n_seen, y, m, den, arg, sk_, sv_
        )
        ctx.dims, ctx.sinks = dims, sinks
        ctx.sink_dtypes = None if sinks == 0 else (sink_k.dtype, sink_v.dtype)
        return y.view(dims.B, dims.H, T, dims.DV)

    @staticmethod
    def backward(ctx, dy):
        q_, k_, v_, fq_, fk_, a, b, c, s0_, z0_, n_seen, y, m, den, arg, sk_, sv_ = ctx.saved_tensors
        d = ctx.dims
        B, H, T, N, SC = d.B, d.H, d.T, d.N, d.SC
        BH = B * H
        has_c = c is not None
        g = dy.reshape(BH, T, d.DV).float()
        gn = (g / den[..., None]).contiguous()  # dL/d numerator
        gd = (-(g * y.float()).sum(-1) / den).contiguous()  # dL/d denominator
        HS, HZ = chunk_states(fk_, v_, N, SC, s0=s0_, z0=z0_, **d.state_options)
        # the dual state of each key/value head: its query heads' states, each times the head's b
        GS, GZ = chunk_states(
            fq_, gn, N, SC, offset=d.P, weights=gd, reverse=True, group=d.G, head_scale=b, **d.state_options
        )

        dq = torch.empty(BH, T, d.D, dtype=torch.float32, device=q_.device)
        dfq = torch.empty(BH, T, d.F, dtype=torch.float32, device=q_.device)
        pa, pb = torch.empty_like(den), torch.empty_like(den)
        pc = torch.zeros_like(den)
        # the sink columns in bwd_dq_kernel ("kernel"): each query tile's part of their dk, dv
        in_kernel = ctx.sinks if d.sink_backward == "kernel" else 0
        n_tiles = d.query_grid[0]
        dsk_parts = q_.new_zeros(BH * n_tiles, in_kernel, d.D, dtype=torch.float32) if in_kernel else dq
        dsv_parts = q_.new_zeros(BH * n_tiles, in_kernel, d.DV, dtype=torch.float32) if in_kernel else dq
        bwd_dq_kernel[d.query_grid](
            q_,
            fq_,
            k_,
            v_,
            fk_,
            HS,
            HZ,
            n_seen,
            a,
            b,
            c if has_c else a,
            gn,
            gd,
            m,
            dq,
            dfq,
            pa,
            pb,
            pc,
            sk_,
            sv_,
            dsk_parts,
            dsv_parts,
            *d.sizes(),
            HAS_C=has_c,
            SINKS=in_kernel,
            BS=pow2_block(max(in_kernel, 1)),
            **d.bwd_const,
        )
        BKV = B * d.HKV
        dk = torch.empty(BKV, N, d.D, dtype=torch.float32, device=q_.device)
        dv = torch.empty(BKV, N, d.DV, dtype=torch.float32, device=q_.device)
        dfk = torch.empty(BKV, N, d.F, dtype=torch.float32, device=q_.device)
        bwd_dkv_kernel[(d.NC, BKV)](
            q_,
            fq_,
            k_,
            v_,
            fk_,
            GS,
            GZ,
            n_seen,
            a,
            b,
            c if has_c else a,
            gn,
            gd,
            m,
            dk,
            dv,
            dfk,
            *d.sizes(),
            HAS_C=has_c,
            NJ=d.NJ,
            **d.bwd_const,
        )

        shape = lambda x, *tail: x.reshape(B, H, *tail)  # noqa: E731
        kv_shape = lambda x, *tail: x.reshape(B, d.HKV, *tail)  # noqa: E731
        kv_rows = d.kv_rows(q_.device)
        a_rows = a.repeat(B)  # [BH]: each head row's a
        keys, dkeys = k_.float(), dk
        if in_kernel:
            dsk = d.per_kv_head(dsk_parts.view(BH, n_tiles, in_kernel, d.D).sum(1))
            dsv = d.per_kv_head(dsv_parts.view(BH, n_tiles, in_kernel, d.DV).sum(1))
        elif ctx.sinks:
            dsk, dsv = _sink_columns_backward(ctx, q_, sk_, sv_, gn, gd, m, n_seen, a_rows, pa, dq, kv_rows)
        if ctx.sinks:
            keys, dkeys = torch.cat([keys, sk_.float()], 1), torch.cat([dk, dsk], 1)
        # the window max m_t moves with its argmax key: dm_t = -a sum_win p dW = -a pa_t
        dm = (-a_rows[:, None] * pa * d.scale)[..., None]  # [BH, T, 1], times the score scale
        at = (kv_rows[:, None] * keys.shape[1] + arg).reshape(
            -1
        )  # the argmax keys' rows in keys [BKV * keys]
        dq += dm * keys.reshape(-1, d.D)[at].view(BH, T, d.D)
        dkeys.view(-1, d.D).index_add_(0, at, (dm * q_.float()).reshape(-1, d.D))
        if ctx.sinks:
            dk, dsk = dkeys[:, :N], dkeys[:, N:]
            sink_grads = (
                kv_shape(dsk, ctx.sinks, d.D).to(ctx.sink_dtypes[0]),
                kv_shape(dsv, ctx.sinks, d.DV).to(ctx.sink_dtypes[1]),
            )
        else:
            sink_grads = (None, None)

        da, db = pa.view(B, H, T).sum((0, 2)), pb.view(B, H, T).sum((0, 2))
        dc = pc.view(B, H, T).sum((0, 2)) if has_c else None
        dS0 = kv_shape(GS[:, 0], d.F, d.DV)  # b is in the dual state already
        dz0 = kv_shape(GZ[:, 0], d.F)
        grads = (
            shape(dq, T, d.D).to(q_.dtype),
            kv_shape(dk, N, d.D).to(k_.dtype),
            kv_shape(dv, N, d.DV).to(v_.dtype),
            shape(dfq, T, d.F).to(fq_.dtype),
            kv_shape(dfk, N, d.F).to(fk_.dtype),
            da,
            db,
            dc,
            *sink_grads,
            dS0,
            dz0,
        )
        return (*grads, None, None, None, None, None, None, None)


#: where the sink columns' backward runs: "kernel" (inside bwd_dq_kernel, the default) or "torch" (fp32
#: [T, SINKS] products in PyTorch, the form it replaced; on an H200 the kernel was faster, run 4 of
#: docs/gpu-check/2026-12-04-h200-tuning, which also timed the products in TF32 and transposed)
SINK_BACKWARDS = ("kernel", "torch")


def _sink_columns_backward(ctx, q_, sk_, sv_, gn, gd, m, n_seen, a_rows, pa, dq, kv_rows):
    """The sink columns' part of the backward pass, in PyTorch ([BH, T, SINKS] products): adds their
    terms to dq and pa (in place) and returns the sinks' dk, dv [B * HKV, SINKS, *] (fp32)."""
    d = ctx.dims
    pos = (n_seen[:, None] + torch.arange(d.T, device=q_.device)).repeat_interleave(d.H, 0)  # [BH, T]
    window, terraced = d.const["W"], d.const["TERRACED"]
    sink_on = sink_open(pos, ctx.sinks, window, terraced)  # [BH, T, SINKS]
    qf, skf, svf = q_.float(), sk_.float()[kv_rows], sv_.float()[kv_rows]  # the sinks: SINKS rows a head
    a3 = a_rows[:, None, None]
    p = torch.exp(torch.bmm(qf, skf.transpose(1, 2)) * d.scale - m[..., None]) * sink_on
    pdw = p * (torch.bmm(gn, svf.transpose(1, 2)) + gd[..., None])
    pa += pdw.sum(-1)
    dq += (a3 * d.scale) * torch.bmm(pdw, skf)
    dsk = (a3 * d.scale) * torch.bmm(pdw.transpose(1, 2), qf)
    dsv = a3 * torch.bmm(p.transpose(1, 2), gn)
    return d.per_kv_head(dsk), d.per_kv_head(dsv)


def _factor(f, H: int, device) -> torch.Tensor:
    """A per-head factor (float, 0-d or [H] tensor) as an fp32 [H] tensor (differentiable)."""
    return torch.as_tensor(f, dtype=torch.float32, device=device).expand(H).contiguous()


def _check(q, k, v, fq, fk, window, key_mask, sinks=0):
    B, H, T, D = q.shape
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")
    HKV = k.shape[1] if k.dim() == 4 else 0
    if (
        HKV < 1
        or H % HKV
        or k.shape != (B, HKV, T, D)
        or v.shape[:3] != (B, HKV, T)
        or fq.shape[:3] != (B, H, T)
        or fk.shape != (B, HKV, T, fq.shape[-1])
    ):
        raise ValueError(
            f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"fq {tuple(fq.shape)}, fk {tuple(fk.shape)} (k, v, fk: [B, HKV, T, *] with HKV dividing H, "
            "the query heads)"
        )
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    for name, x in (("q", q), ("k", k), ("v", v), ("fq", fq), ("fk", fk)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"the Triton window hybrid takes {SUPPORTED_DTYPES}; {name} is {x.dtype}")
    if key_mask is not None and not bool(key_mask.bool().all()):
        raise ValueError(
            "the Triton window hybrid takes no padding (key_mask with zeros); "
            "use zoo.kernels.window_hybrid.window_hybrid_chunked"
        )


def _tiles(q, v, fq, chunk_size, state_chunk) -> tuple[int, int]:
    shared = device_shared_bytes(q.device)
    block = chunk_size or chosen_tile(q.shape[-1], v.shape[-1], fq.shape[-1], q.dtype, shared)
    if block < 16 or block & (block - 1):
        raise ValueError(f"chunk_size (the kernel's tile) must be a power of two >= 16, got {block}")
    state_chunk = state_chunk or _LAUNCH.get("state_chunk") or max(STATE_CHUNK, block)
    if state_chunk % block:
        raise ValueError(f"state_chunk ({state_chunk}) must be a multiple of the tile ({block})")
    return block, state_chunk


def window_hybrid_triton(
    q,
    k,
    v,
    fq,
    fk,
    a,
    b,
    *,
    window=64,
    terraced=False,
    scale=None,
    state=None,
    key_mask=None,
    c=None,
    chunk_size=None,
    state_chunk=None,
    sinks=0,
):
    """Fused chunked form (see the module docstring). `chunk_size`: the kernel's query / key tile (a power
    of two >= 16; default `tile_rows`); `state_chunk`: rows between stored linear states (default 64);
    phi(q), phi(k) are read in the dtype of `feature_dtype` (16-bit inputs: theirs);
    `sinks`: attention sinks, as in the PyTorch forms (the state carries their keys and values)."""
    _check(q, k, v, fq, fk, window, key_mask, sinks)
    _check_state_sinks(state, sinks)
    block, state_chunk = _tiles(q, v, fq, chunk_size, state_chunk)
    B, H, T, D = q.shape
    scale = D**-0.5 if scale is None else float(scale)
    kdt = torch.promote_types(q.dtype, k.dtype)
    fdt = feature_dtype(kdt, fq.dtype, fk.dtype)
    sink_k = sink_v = None
    if sinks:
        held = state if state is not None else _fresh_state(k, v, fk, window, terraced, sinks)
        every = torch.ones(B, T, dtype=torch.bool, device=q.device)
        fk = drop_sink_features(fk, every, held.n, sinks)
        sink_k, sink_v = updated_sink_slots(k, v, every, held, sinks)
    ext = extend_with_state(k.to(kdt), v, fk.to(fdt), state, window, terraced)
    factors = [None if f is None else _factor(f, H, q.device) for f in (a, b, c)]
    y = _WindowHybridFn.apply(
        q.to(kdt),
        ext.k,
        ext.v,
        fq.to(fdt),
        ext.fk,
        *factors,
        sink_k,
        sink_v,
        ext.S0,
        ext.z0,
        ext.n_seen,
        ext.prefix,
        window,
        terraced,
        scale,
        block,
        state_chunk,
    )
    new = advance_state(ext, window, terraced, like=state)
    if sinks:
        new = dataclasses.replace(new, sink_k=sink_k, sink_v=sink_v)
    return y.to(q.dtype), new


def _fresh_state(k, v, fk, window: int, terraced: bool, sinks: int) -> WindowHybridState:
    """The state before any token: one head per key/value head of k, fp32 sums."""
    dims = (*k.shape[:2], k.shape[-1], v.shape[-1], fk.shape[-1])
    return WindowHybridState.empty(*dims, window, terraced, k.dtype, k.device, sinks=sinks)


def _check_state_sinks(state, sinks: int) -> None:
    if state is not None and state.sinks != sinks:
        raise ValueError(f"state was made with sinks={state.sinks}; called with sinks={sinks}")


def window_hybrid_step_triton(
    q,
    k,
    v,
    fq,
    fk,
    a,
    b,
    *,
    window=64,
    terraced=False,
    scale=None,
    state=None,
    key_mask=None,
    c=None,
    chunk_size=None,
    sinks=0,
):
    """Fused decoding step, one kernel launch per new token (inference only: no autograd).
    key_mask [B, T] may mark tokens as padding: they get y = 0 and leave the state unchanged."""
    B, H, T, D = q.shape
    _check(q, k, v, fq, fk, window, None, sinks)
    _check_state_sinks(state, sinks)
    if state is None:
        state = _fresh_state(k, v, fk, window, terraced, sinks)
    elif state.window != window or state.terraced != terraced:
        raise ValueError(
            f"state was made with window={state.window}, terraced={state.terraced}; "
            f"called with window={window}, terraced={terraced}"
        )
    real = (
        torch.ones(B, T, dtype=torch.bool, device=q.device)
        if key_mask is None
        else key_mask.to(q.device).bool()
    )
    scale = D**-0.5 if scale is None else float(scale)
    factors = [None if f is None else _factor(f, H, q.device).detach() for f in (a, b, c)]
    ys = []
    with torch.no_grad():
        for t in range(T):
            y, state = step_one_token(
                q[:, :, t],
                k[:, :, t],
                v[:, :, t],
                fq[:, :, t],
                fk[:, :, t],
                *factors,
                state,
                real[:, t],
                scale,
            )
            ys.append(y)
    y = torch.stack(ys, dim=2) if ys else q.new_zeros(B, H, 0, v.shape[-1])
    return y.to(q.dtype), state
