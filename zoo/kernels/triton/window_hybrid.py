"""The window hybrid (LoLCATs) on Triton: training / prefill with autograd, and the decoding step.

`window_hybrid_triton` and `window_hybrid_step_triton` take the arguments of
zoo.kernels.window_hybrid.window_hybrid_chunked / _step and return y [B, H, T, Dv] (q's dtype) and the
next WindowHybridState, interchangeable with the PyTorch forms' states. Differentiable in q, k, v, fq,
fk, a, b, c and the incoming state (the step form is for inference: no autograd).

Limits (the dispatcher routes these to the PyTorch forms): no padding (key_mask must be all ones, or
None) in the chunked form; dtypes float32, bfloat16, float16. The kernels are in hybrid_kernels.py.
"""

from __future__ import annotations

import torch
import triton

from zoo.kernels.triton.chunk_states import chunk_states, pow2_block
from zoo.kernels.triton.hybrid_kernels import bwd_dkv_kernel, bwd_dq_kernel, fwd_kernel
from zoo.kernels.triton.hybrid_step import step_one_token
from zoo.kernels.window_hybrid import WindowHybridState
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


def tile_rows(D: int, DV: int, F: int) -> int:
    """Query / key tile (rows) for head sizes D, DV and F features: chosen so that the kernels, compiled
    for sm_90 with `launch_options`, keep their tiles in registers (ptxas reported no spills at
    D = DV = 64, F = 128 with 32 rows and at D = DV = 128, F = 256 with 16 rows). Not yet timed on a GPU."""
    return 32 if max(D, DV) <= 64 and F <= 128 else 16


def launch_options(D: int, DV: int, F: int) -> dict:
    """num_warps / num_stages for the hybrid's kernels (see `tile_rows`)."""
    big = max(D, DV) > 64 or F > 128
    return dict(num_warps=8, num_stages=1 if big else 2)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[2:]).contiguous()


class Dims:
    """Sizes and launch constants shared by the forward and backward launches."""

    def __init__(self, q, k, v, fq, window, terraced, scale, block, state_chunk, prefix):
        self.B, self.H, self.T, self.D = q.shape
        self.N, self.DV, self.F = k.shape[2], v.shape[-1], fq.shape[-1]
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
            **launch_options(self.D, self.DV, self.F),
        )
        self.NJ = (
            triton.cdiv(span + state_chunk, block) + 1
        )  # bound on the query tiles whose band holds a key tile

    @property
    def query_grid(self):
        return (self.NC - self.P // self.C, self.B * self.H)

    def sizes(self):
        return self.T, self.N, self.P, self.NC, self.NS, self.H, self.scale


class _WindowHybridFn(torch.autograd.Function):
    """y from q, fq [B, H, T, *] and the extended k, v, fk [B, H, P + T, *]; see hybrid_kernels.py."""

    @staticmethod
    def forward(
        ctx, q, k, v, fq, fk, a, b, c, S0, z0, n_seen, prefix, window, terraced, scale, block, state_chunk
    ):
        dims = Dims(q, k, v, fq, window, terraced, scale, block, state_chunk, prefix)
        BH, T = dims.B * dims.H, dims.T
        q_, k_, v_, fq_, fk_ = (_flat(x) for x in (q, k, v, fq, fk))
        s0_, z0_ = _flat(S0.float()), _flat(z0.float())
        HS, HZ = chunk_states(fk_, v_, dims.N, state_chunk, s0=s0_, z0=z0_, precision=dims.const["PREC"])
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
            y,
            m,
            den,
            arg,
            *dims.sizes(),
            HAS_C=has_c,
            **dims.const,
        )
        ctx.save_for_backward(
            q_, k_, v_, fq_, fk_, a, b, c if has_c else None, s0_, z0_, n_seen, y, m, den, arg
        )
        ctx.dims = dims
        return y.view(dims.B, dims.H, T, dims.DV)

    @staticmethod
    def backward(ctx, dy):
        q_, k_, v_, fq_, fk_, a, b, c, s0_, z0_, n_seen, y, m, den, arg = ctx.saved_tensors
        d = ctx.dims
        B, H, T, N, SC = d.B, d.H, d.T, d.N, d.SC
        BH, prec = B * H, d.const["PREC"]
        has_c = c is not None
        g = dy.reshape(BH, T, d.DV).float()
        gn = (g / den[..., None]).contiguous()  # dL/d numerator
        gd = (-(g * y.float()).sum(-1) / den).contiguous()  # dL/d denominator
        HS, HZ = chunk_states(fk_, v_, N, SC, s0=s0_, z0=z0_, precision=prec)
        GS, GZ = chunk_states(fq_, gn, N, SC, offset=d.P, weights=gd, reverse=True, precision=prec)

        dq = torch.empty(BH, T, d.D, dtype=torch.float32, device=q_.device)
        dfq = torch.empty(BH, T, d.F, dtype=torch.float32, device=q_.device)
        pa, pb = torch.empty_like(den), torch.empty_like(den)
        pc = torch.zeros_like(den)
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
            *d.sizes(),
            HAS_C=has_c,
            **d.const,
        )
        dk = torch.empty(BH, N, d.D, dtype=torch.float32, device=q_.device)
        dv = torch.empty(BH, N, d.DV, dtype=torch.float32, device=q_.device)
        dfk = torch.empty(BH, N, d.F, dtype=torch.float32, device=q_.device)
        bwd_dkv_kernel[(d.NC, BH)](
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
            **d.const,
        )

        # the window max m_t moves with its argmax key: dm_t = -a sum_win p dW = -a pa_t
        dm = (-a.repeat(B)[:, None] * pa * d.scale)[..., None]  # [BH, T, 1], times the score scale
        idx = arg[..., None].expand(-1, -1, d.D)
        dq += dm * k_.float().gather(1, idx)
        dk.scatter_add_(1, idx, dm * q_.float())

        shape = lambda x, *tail: x.view(B, H, *tail)  # noqa: E731
        da, db = pa.view(B, H, T).sum((0, 2)), pb.view(B, H, T).sum((0, 2))
        dc = pc.view(B, H, T).sum((0, 2)) if has_c else None
        dS0 = b.view(1, H, 1, 1) * shape(GS[:, 0], d.F, d.DV)
        dz0 = b.view(1, H, 1) * shape(GZ[:, 0], d.F)
        grads = (
            shape(dq, T, d.D).to(q_.dtype),
            shape(dk, N, d.D).to(k_.dtype),
            shape(dv, N, d.DV).to(v_.dtype),
            shape(dfq, T, d.F).to(fq_.dtype),
            shape(dfk, N, d.F).to(fk_.dtype),
            da,
            db,
            dc,
            dS0,
            dz0,
        )
        return (*grads, None, None, None, None, None, None, None)


def _factor(f, H: int, device) -> torch.Tensor:
    """A per-head factor (float, 0-d or [H] tensor) as an fp32 [H] tensor (differentiable)."""
    return torch.as_tensor(f, dtype=torch.float32, device=device).expand(H).contiguous()


def _check(q, k, v, fq, fk, window, key_mask):
    B, H, T, D = q.shape
    if k.shape != q.shape or v.shape[:3] != (B, H, T) or fq.shape[:3] != (B, H, T) or fk.shape != fq.shape:
        raise ValueError(
            f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"fq {tuple(fq.shape)}, fk {tuple(fk.shape)} (k, v must be repeated to H heads)"
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
    block = chunk_size or tile_rows(q.shape[-1], v.shape[-1], fq.shape[-1])
    if block < 16 or block & (block - 1):
        raise ValueError(f"chunk_size (the kernel's tile) must be a power of two >= 16, got {block}")
    state_chunk = state_chunk or max(STATE_CHUNK, block)
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
):
    """Fused chunked form (see the module docstring). `chunk_size`: the kernel's query / key tile (a power
    of two >= 16; default `tile_rows`); `state_chunk`: rows between stored linear states (default 64)."""
    _check(q, k, v, fq, fk, window, key_mask)
    block, state_chunk = _tiles(q, v, fq, chunk_size, state_chunk)
    H, D = q.shape[1], q.shape[3]
    scale = D**-0.5 if scale is None else float(scale)
    kdt = torch.promote_types(q.dtype, k.dtype)
    fdt = torch.promote_types(fq.dtype, fk.dtype)
    ext = extend_with_state(k.to(kdt), v, fk.to(fdt), state, window, terraced)
    factors = [None if f is None else _factor(f, H, q.device) for f in (a, b, c)]
    y = _WindowHybridFn.apply(
        q.to(kdt),
        ext.k,
        ext.v,
        fq.to(fdt),
        ext.fk,
        *factors,
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
    return y.to(q.dtype), advance_state(ext, window, terraced, like=state)


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
):
    """Fused decoding step, one kernel launch per new token (inference only: no autograd).
    key_mask [B, T] may mark tokens as padding: they get y = 0 and leave the state unchanged."""
    B, H, T, D = q.shape
    _check(q, k, v, fq, fk, window, None)
    if state is None:
        cdt = torch.float32
        state = WindowHybridState.empty(
            B, H, D, v.shape[-1], fq.shape[-1], window, terraced, k.dtype, q.device, acc_dtype=cdt
        )
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
