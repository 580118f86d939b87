"""The chunked form of (gated, optionally normalized) linear attention, with a backward of its own.

Shapes, batch and heads flattened: q, k [BH, T, Dk] and v [BH, T, Dv] fp32, T a multiple of the chunk
size C; log_gate None, [BH, T] (one scalar per step) or [BH, T, Dk] (one per key dimension); the state
S [BH, Dk, Dv] and, when normalizing, z [BH, Dk, 1].

Forward: one pass over the chunks. Per chunk the gates are folded into q and k (`_fold`), the entering
state is read, the chunk's own masked [C, C] part is added, and S, z are updated in place. Working sets
stay chunk-sized, and nothing per chunk is kept for the backward.

Backward, recomputing rather than storing: a forward pass rebuilds each entering state and gives dq and
the in-chunk parts of dk, dv; a reverse pass carries dS, dz and adds the state parts of dk, dv. The gate
gradient needs no pass of its own. With G_t the cumulative log gate, q_t enters every product as
q_t e^{G_t} and k_t as k_t e^{-G_t}, and S_T carries e^{G_T}, so

    dL/dG_t = q_t * dq_t - k_t * dk_t  (+ <dS_T, S_T> + dz_T * z_T at the last step),
    dL/dlog_gate_s = sum_{t >= s} dL/dG_t.

Compared with autograd through the chunk loop this keeps no per-chunk graph (no per-chunk state copies,
no freshly allocated gradient per op), which on a CPU is most of the cost.

On the CPU in fp32, two of the long elementwise passes run in C where zoo's kernels build
(zoo.kernels.native): the fold of mild per-key gates (csrc/gate_fold.c: the in-chunk cumulative gate, the
decayed q and k, and the factors the backward needs) and the per-key gate gradient (csrc/gate_grad.c).
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch

from zoo.kernels import native
from zoo.kernels._utils import lower_triangle

#: per-key gates: a chunk whose total log decay stays above -FACTOR_LIMIT takes the factored fast path
FACTOR_LIMIT = 30.0
#: sub-chunk length of the safe path for stronger per-key decay
SUB_CHUNK = 16


def _advance(S: torch.Tensor, z: torch.Tensor | None, f, v_n: torch.Tensor) -> None:
    """In place: carry the state (S, and the normalizer z when there is one) past chunk n, whose fold
    is `f` and values `v_n`: decay, then add the chunk's writes."""
    if f.decay is not None:
        S.mul_(f.decay)
    S.baddbmm_(f.write.transpose(1, 2), v_n)
    if z is not None:
        if f.decay is not None:
            z.mul_(f.decay)
        z.add_(f.write.sum(1)[..., None])


class _Fold(NamedTuple):
    """One chunk's operands with its gates folded in ([BH, C, .]).

    ask, attend: queries and keys of the in-chunk scores ask_i . attend_j (None: strong per-key decay,
    whose in-chunk part `intra_key_gated` forms elementwise); score_decay: scalar gates' [BH, C, C]
    exp(b_i - b_j) below the diagonal, 0 above (None: a plain causal mask); read: queries decayed from
    the chunk start, reading the entering state; write: keys decayed to the chunk end, updating it;
    decay: the chunk's total decay of the state ([BH, 1, 1] or [BH, Dk, 1]) or None; ask_scale,
    attend_scale, read_scale, write_scale: the elementwise factors from q, k to those four (None: 1);
    b: the in-chunk cumulative log gate (strong decay only)."""

    ask: torch.Tensor | None
    attend: torch.Tensor | None
    score_decay: torch.Tensor | None
    read: torch.Tensor
    write: torch.Tensor
    decay: torch.Tensor | None
    ask_scale: torch.Tensor | None
    attend_scale: torch.Tensor | None
    read_scale: torch.Tensor | None
    write_scale: torch.Tensor | None
    b: torch.Tensor | None


def _fold(kind: str | None, q, k, g, strong: bool, above: torch.Tensor) -> _Fold:
    """q, k [BH, C, Dk]; g this chunk's log gate ([BH, C] already cumulated in-chunk for scalar gates,
    [BH, C, Dk] raw for per-key gates)."""
    if kind is None:
        return _Fold(q, k, None, q, k, None, None, None, None, None, None)
    if kind == "scalar":
        b, b_last = g[..., None], g[:, -1:, None]  # [BH, C, 1], [BH, 1, 1]
        rel = (g[:, :, None] - g[:, None, :]).masked_fill(above, float("-inf")).exp()
        read_scale, write_scale = b.exp(), (b_last - b).exp()
        return _Fold(
            q,
            k,
            rel,
            q * read_scale,
            k * write_scale,
            b_last.exp(),
            None,
            None,
            read_scale,
            write_scale,
            None,
        )
    b = g.cumsum(dim=1)
    b_last = b[:, -1:]
    read_scale = b.exp()
    read = q * read_scale
    if not strong:
        # mild decay (the usual case): exp(b_i - b_j) = exp(b_i) * exp(-b_j), and exp(-b_j) stays below
        # exp(FACTOR_LIMIT), so the scores are one product of decayed queries and undecayed keys
        attend_scale = torch.exp(-b)
        attend = k * attend_scale
        chunk_decay = read_scale[:, -1:]
        return _Fold(
            read,
            attend,
            None,
            read,
            attend * chunk_decay,
            chunk_decay.transpose(1, 2),
            read_scale,
            attend_scale,
            read_scale,
            attend_scale * chunk_decay,
            None,
        )
    write_scale = (b_last - b).exp()
    return _Fold(
        None,
        None,
        None,
        read,
        k * write_scale,
        b_last.exp().transpose(1, 2),
        None,
        None,
        read_scale,
        write_scale,
        b,
    )


def intra_key_gated(q, k, v, b, sub: int) -> torch.Tensor:
    """In-chunk output with per-key decays, safe for any decay. q, k, b [..., C, Dk] (b: the in-chunk
    cumulative log gate), v [..., C, Dv]. Returns sum_{j<=i} (q_i * exp(b_i - b_j)) . k_j v_j."""
    *lead, C, Dk = q.shape
    P = C // sub
    qs, ks, bs, vs = (t.reshape(*lead, P, sub, t.shape[-1]) for t in (q, k, b, v))
    # inside each sub-chunk: the decay per element, exp(b_i - b_j) for j <= i, one key column at a time
    cols = [
        (qs * (bs - bs[..., j : j + 1, :]).clamp(max=0).exp() * ks[..., j : j + 1, :]).sum(-1)
        for j in range(sub)
    ]
    a = torch.stack(cols, dim=-1).masked_fill(~lower_triangle(sub, q.device), 0.0)
    y = a @ vs  # [..., P, sub, Dv]
    if P > 1:
        # across sub-chunks: relative to r_p, the cumulative log gate just before sub-chunk p,
        # q_i exp(b_i - r_p) and k_j exp(r_p - b_j) for j before sub-chunk p; both exponents <= 0
        r = torch.cat([torch.zeros_like(bs[..., :1, 0, :]), bs[..., :-1, -1, :]], dim=-2)  # [..., P, Dk]
        qt = qs * (bs - r[..., None, :]).exp()
        before = torch.arange(C, device=q.device)[None, :] < (torch.arange(P, device=q.device) * sub)[:, None]
        e = (r[..., :, None, :] - b[..., None, :, :]).masked_fill(~before[..., None], float("-inf")).exp()
        kt = k[..., None, :, :] * e  # [..., P, C, Dk]
        y = y + (qt @ kt.transpose(-1, -2)) @ v[..., None, :, :]
    return y.reshape(*lead, C, v.shape[-1])


def _scaled_into(out: torch.Tensor, t: torch.Tensor, scale: torch.Tensor | None) -> None:
    """out = t * scale (scale None: 1), written into out's memory (a view of a larger tensor)."""
    if scale is None:
        out.copy_(t)
    else:
        torch.mul(t, scale, out=out)


def _add_scaled(out: torch.Tensor, t: torch.Tensor, scale: torch.Tensor | None) -> None:
    """out += t * scale (scale None: 1), in place."""
    if scale is None:
        out.add_(t)
    else:
        out.addcmul_(t, scale)


def _fold_in_c(q, k, log_gate, kind):
    """The C form of the mild per-key fold (csrc/gate_fold.c) where it serves these inputs, else None: per-key
    gates, fp32 on the CPU, contiguous, and the kernel built."""
    if kind != "key" or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in (q, k, log_gate)):
        return None
    if not (q.is_contiguous() and k.is_contiguous() and log_gate.is_contiguous()):
        return None
    return native.function(
        "gate_fold",
        "zoo_fold_key_gates_f32",
        [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 10 + [ctypes.c_int],
        restype=None,
    )


class _Chunks:
    """The chunked view of one call: chunk slices of the inputs, the per-chunk gate and fold. `scales`: the
    folds carry the factors from q and k (the backward needs them; the forward does not)."""

    def __init__(self, q, k, v, log_gate, kind, C, scales=True):
        self.kind, self.C, self.with_scales = kind, C, scales
        self.q_all, self.k_all, self.g_all = q, k, log_gate
        self.c_fold = _fold_in_c(q, k, log_gate, kind)
        self.q, self.k, self.v = q.split(C, 1), k.split(C, 1), v.split(C, 1)
        self.n = len(self.q)
        self.above = ~lower_triangle(C, q.device)
        self.strong = [False] * self.n
        if kind == "scalar":  # [BH, T] is small: cumulate every chunk at once
            self.g = log_gate.reshape(log_gate.shape[0], -1, C).cumsum(dim=2).unbind(1)
        elif kind == "key":
            self.g = log_gate.split(C, 1)
            BH, T, Dk = log_gate.shape
            totals = log_gate.reshape(BH, -1, C, Dk).sum(2).amin(dim=(0, 2))  # [N]: the strongest chunk decay
            self.strong = (totals < -FACTOR_LIMIT).tolist()

    def fold(self, n: int) -> _Fold:
        if self.c_fold is not None and not self.strong[n]:
            return self._fold_c(n)
        return _fold(
            self.kind,
            self.q[n],
            self.k[n],
            None if self.kind is None else self.g[n],
            self.strong[n],
            self.above,
        )

    def _fold_c(self, n: int) -> _Fold:
        """The mild per-key fold of chunk n in one C call (see `_fold`)."""
        q = self.q_all
        BH, T, Dk = q.shape
        C = self.q[n].shape[1]
        read, attend, write = (q.new_empty(BH, C, Dk) for _ in range(3))
        decay = q.new_empty(BH, Dk, 1)
        scales = [q.new_empty(BH, C, Dk) for _ in range(3)] if self.with_scales else [None] * 3
        ptrs = [t.data_ptr() for t in (q, self.k_all, self.g_all, read, attend, write, decay)]
        ptrs += [None if t is None else t.data_ptr() for t in scales]
        self.c_fold(BH, T, C, Dk, n * self.C, *ptrs, torch.get_num_threads())
        read_scale, attend_scale, write_scale = scales
        return _Fold(
            read, attend, None, read, write, decay, read_scale, attend_scale, read_scale, write_scale, None
        )

    def scores(self, f: _Fold) -> torch.Tensor:
        """The in-chunk scores [BH, C, C]: masked and decayed."""
        a = torch.bmm(f.ask, f.attend.transpose(1, 2))
        return a.mul_(f.score_decay) if f.score_decay is not None else a.masked_fill_(self.above, 0.0)

    def intra_strong(self, n: int, f: _Fold, normalize: bool) -> torch.Tensor:
        """Strong per-key decay: the in-chunk numerator (and denominator as a last column)."""
        v = self.v[n]
        if normalize:
            v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
        C = self.C
        return intra_key_gated(self.q[n], self.k[n], v, f.b, SUB_CHUNK if C % SUB_CHUNK == 0 else C)


class ChunkedLinearAttention(torch.autograd.Function):
    """(q, k, v, log_gate, S0, z0, kind, normalize, eps, C) -> (y [BH, T, Dv], S [BH, Dk, Dv], z [BH, Dk, 1]);
    z0 and z are None without normalizing."""

    @staticmethod
    def forward(ctx, q, k, v, log_gate, S0, z0, kind, normalize, eps, C):
        BH, T, Dv = v.shape
        ch = _Chunks(q, k, v, log_gate, kind, C, scales=False)
        S = S0.clone()
        z = None if z0 is None else z0.clone()
        y = torch.empty_like(v)
        den = v.new_empty(BH, T, 1) if normalize else None
        for n in range(ch.n):
            f = ch.fold(n)
            sl = slice(n * C, (n + 1) * C)
            if f.ask is None:
                intra = ch.intra_strong(n, f, normalize)
                num, d = torch.baddbmm(intra[..., :Dv], f.read, S), intra[..., Dv:]
            else:
                a = ch.scores(f)
                num = torch.baddbmm(torch.bmm(f.read, S), a, ch.v[n])
                d = a.sum(-1, keepdim=True) if normalize else None
            if normalize:
                d = torch.baddbmm(d, f.read, z).add_(eps)
                den[:, sl] = d
                torch.div(num, d, out=y[:, sl])
            else:
                y[:, sl] = num
            _advance(S, z, f, ch.v[n])
        ctx.kind, ctx.normalize, ctx.C, ctx.strong = kind, normalize, C, ch.strong
        ctx.save_for_backward(q, k, v, log_gate, S0, z0, y, den, S, z)
        return y, S, z

    @staticmethod
    def backward(ctx, dy, dS_T, dz_T):
        q, k, v, log_gate, S0, z0, y, den, S_T, z_T = ctx.saved_tensors
        kind, normalize, C = ctx.kind, ctx.normalize, ctx.C
        ch = _Chunks(q, k, v, log_gate, kind, C)
        dy = torch.zeros_like(y) if dy is None else dy.contiguous()
        # per chunk: gradients reaching the numerator and the denominator
        if normalize:
            dnums = (dy / den).split(C, 1)
            ddens = (-(dy * y).sum(-1, keepdim=True) / den).split(C, 1)
        else:
            dnums, ddens = dy.split(C, 1), None
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _in_chunk_grads(ch, S0, z0, dnums, ddens, normalize, dq, dk, dv)
        dS, dz = _state_grads(ch, S0, z0, dnums, ddens, normalize, dS_T, dz_T, dk, dv)
        dg = None
        if kind is not None and ctx.needs_input_grad[3]:
            dg = _gate_grad(kind, normalize, q, k, dq, dk, S_T, z_T, dS_T, dz_T)
        return dq, dk, dv, dg, dS, dz, None, None, None, None


def _in_chunk_grads(ch: _Chunks, S0, z0, dnums, ddens, normalize: bool, dq, dk, dv) -> None:
    """Forward over the chunks, rebuilding the entering states: writes dq, and the in-chunk parts of dk and
    dv, into the given tensors."""
    C = ch.C
    S = S0.clone()
    z = None if z0 is None else z0.clone()
    for n in range(ch.n):
        f = ch.fold(n)
        dnum = dnums[n]
        dread = torch.bmm(dnum, S.transpose(1, 2))
        if normalize:
            dread.add_(ddens[n] * z.transpose(1, 2))
        sl = slice(n * C, (n + 1) * C)
        if f.ask is None:
            dq_n, dk_n, dv_n = _strong_grads(ch, n, f, dnum, None if ddens is None else ddens[n], normalize)
            dq[:, sl], dk[:, sl], dv[:, sl] = dq_n + dread * f.read_scale, dk_n, dv_n
        else:
            dp = torch.bmm(dnum, ch.v[n].transpose(1, 2))
            if normalize:
                dp.add_(ddens[n])
            dp = dp.mul_(f.score_decay) if f.score_decay is not None else dp.masked_fill_(ch.above, 0.0)
            # written into the chunk's rows of dq and dk: no chunk-sized copy after each product
            _scaled_into(dq[:, sl], torch.bmm(dp, f.attend), f.ask_scale)
            _add_scaled(dq[:, sl], dread, f.read_scale)
            _scaled_into(dk[:, sl], torch.bmm(dp.transpose(1, 2), f.ask), f.attend_scale)
            dv[:, sl] = torch.bmm(ch.scores(f).transpose(1, 2), dnum)
        _advance(S, z, f, ch.v[n])


def _state_grads(ch: _Chunks, S0, z0, dnums, ddens, normalize: bool, dS_T, dz_T, dk, dv):
    """Reverse over the chunks, carrying dS and dz: adds the state parts of dk and dv (in place) and returns
    the gradients of the entering state (dS0, dz0)."""
    C = ch.C
    dS = torch.zeros_like(S0) if dS_T is None else dS_T.clone()
    dz = None
    if normalize:
        dz = torch.zeros_like(z0) if dz_T is None else dz_T.clone()
    for n in reversed(range(ch.n)):
        f = ch.fold(n)
        sl = slice(n * C, (n + 1) * C)
        dv[:, sl] += torch.bmm(f.write, dS)
        dwrite = torch.bmm(ch.v[n], dS.transpose(1, 2))
        if normalize:
            dwrite.add_(dz.transpose(1, 2))
        _add_scaled(dk[:, sl], dwrite, f.write_scale)
        if f.decay is not None:
            dS.mul_(f.decay)
        dS.baddbmm_(f.read.transpose(1, 2), dnums[n])
        if normalize:
            if f.decay is not None:
                dz.mul_(f.decay)
            dz.baddbmm_(f.read.transpose(1, 2), ddens[n])
    return dS, dz


def _gate_grad(kind: str, normalize: bool, q, k, dq, dk, S_T, z_T, dS_T, dz_T):
    """The gradient of the log gates: dL/dG_t per key dimension, summed over the steps it decays."""
    last = (dS_T * S_T).sum(-1) if dS_T is not None else torch.zeros_like(S_T[..., 0])
    if normalize and dz_T is not None:
        last = last + (dz_T * z_T)[..., 0]
    fused = _key_gate_grad_in_c(kind, q, k, dq, dk, last)
    if fused is not None:
        return fused
    dG = q * dq - k * dk
    dG[:, -1] += last
    if kind == "scalar":
        dG = dG.sum(-1)
    return dG.flip(1).cumsum(1).flip(1)


def _key_gate_grad_in_c(kind, q, k, dq, dk, last):
    """`_gate_grad` for per-key gates in one C pass (csrc/gate_grad.c), on the CPU in fp32 where the kernel
    builds; else None."""
    tensors = (q, k, dq, dk, last)
    if kind != "key" or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    fn = native.function(
        "gate_grad",
        "zoo_key_gate_grad_f32",
        [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 6 + [ctypes.c_int],
        None,
    )
    if fn is None:
        return None
    q, k, dq, dk, last = (t.contiguous() for t in tensors)
    BH, T, Dk = q.shape
    out = torch.empty_like(q)
    fn(BH, T, Dk, *(t.data_ptr() for t in (q, dq, k, dk, last, out)), torch.get_num_threads())
    return out


def _strong_grads(ch: _Chunks, n: int, f: _Fold, dnum, dden, normalize: bool):
    """Strong per-key decay: (dq, dk, dv) of the in-chunk part, by autograd through `intra_key_gated` on
    this chunk alone."""
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_(True) for t in (ch.q[n], ch.k[n], ch.v[n]))
        va = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1) if normalize else v
        C = ch.C
        intra = intra_key_gated(q, k, va, f.b, SUB_CHUNK if C % SUB_CHUNK == 0 else C)
        grad = torch.cat([dnum, dden], dim=-1) if normalize else dnum
        return torch.autograd.grad(intra, (q, k, v), grad)
