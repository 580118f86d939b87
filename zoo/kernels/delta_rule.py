"""The (gated) delta rule: DeltaNet and Gated DeltaNet.

    S_t = g_t (S_{t-1} - beta_t k_t (k_t^T S_{t-1})) + beta_t k_t v_t^T        y_t = q_t S_t

S is [Dk, Dv] per batch and head: the write replaces (a fraction beta_t of) what S held along k_t by
v_t, and the whole memory decays by the scalar g_t first. Shapes: q, k [B, H, T, Dk] (k L2-normalized
by the caller, so that I - beta k k^T is a contraction), v [B, H, T, Dv], beta [B, H, T] in (0, 1),
log_gate [B, H, T] = log g <= 0 (finite) or None (plain DeltaNet, g = 1). The state is a plain fp32
tensor [B, H, Dk, Dv] whatever the input dtype; the output has v's dtype.

Three forms with one signature `(q, k, v, beta, log_gate=None, state=None)`: `delta_rule_naive` (fp32
loop over time, written as the recurrence reads; the reference), `delta_rule_chunked` (chunks of 32 or
64 tokens, linear in T, the CPU prefill and training path) and `delta_rule_step` (the recurrent form, for
decoding). `delta_rule` dispatches between the last two.

Padding needs no mask: beta = 0 and log_gate = 0 at a position leave the state untouched (its k and v
then do not matter, but keep them finite).

The chunked form (WY / UT transform). Write the step as S_t = g_t S_{t-1} + k_t u_t^T with the
"pseudo-value" u_t = beta_t (v_t - g_t S_{t-1}^T k_t). Inside a chunk with entering state S0 and
in-chunk cumulative log gate b_i (gamma_i = exp(b_i)), unrolling gives the lower-triangular system

    (I + A) U = diag(beta) V - diag(beta * gamma) K S0,   A_ij = beta_i exp(b_i - b_j) k_i.k_j  (j < i)

so U = U_v - W S0 with U_v = (I + A)^-1 diag(beta) V and W = (I + A)^-1 diag(beta gamma) K: one
triangular solve per chunk, all chunks at once. With P = (Q K^T) * exp(b_i - b_j) (j <= i) the chunk's
outputs and final state are

    Y = P U_v + (diag(gamma) Q - P W) S0                      (the first term needs no S0)
    S_C = (gamma_C I - K_C^T W) S0 + K_C^T U_v,               K_C = diag(exp(b_C - b_j)) K

so everything but the read Q' S0 and the carry (three thin products per chunk) is computed for all
chunks in parallel before the short sequential loop over chunks. The backward mirrors it: the carry's
gradient runs backwards over the chunks (three thin products each, from the entering states kept by the
forward), then every other gradient for all chunks at once, through U_v and W by
d(I + A) = -(I + A)^-T (dU_v U_v^T + dW W^T) and into the gates through the cumulative log gate b.

Gates enter only as exp(b_i - b_j) with j <= i, exp(b_i) and exp(b_C - b_j): every exponent is <= 0,
so no decay, however strong, overflows; strong decay underflows to exact zeros, never to NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from zoo.kernels._utils import lower_triangle, pad_time, round_up

__all__ = ["delta_rule", "delta_rule_chunked", "delta_rule_naive", "delta_rule_step"]

#: at most this many new tokens go through the recurrent step form in `delta_rule`
STEP_THRESHOLD = 16
_MIN_CHUNK = 16
#: the chunk length by default: without autograd 32, whose forward measured 15% faster than 64's on the
#: CPU (Llama-3-8B's layer shape, T = 8192, 2 threads, with and without a gate); under autograd 64, as fast
#: for forward + backward and half the entering states kept for the backward (docs/kernels.md)
CHUNK_INFERENCE, CHUNK_TRAINING = 32, 64


def _check(q, k, v, beta, log_gate, state) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"expected q, k [B, H, T, Dk] and v [B, H, T, Dv] alike; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be [B, H, T] {tuple(q.shape[:3])}, got {tuple(beta.shape)}")
    if log_gate is not None and log_gate.shape != q.shape[:3]:
        raise ValueError(
            f"log_gate must be [B, H, T] {tuple(q.shape[:3])} (one scalar per head and step), "
            f"got {tuple(log_gate.shape)}"
        )
    B, H, _, Dk = q.shape
    if state is not None and tuple(state.shape) != (B, H, Dk, v.shape[-1]):
        raise ValueError(f"state must be [B, H, Dk, Dv] {(B, H, Dk, v.shape[-1])}, got {tuple(state.shape)}")


def _initial(q: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
    B, H, _, Dk = q.shape
    if state is None:
        return q.new_zeros(B, H, Dk, v.shape[-1], dtype=torch.float32)
    return state.float()


def delta_rule_naive(q, k, v, beta, log_gate=None, state=None):
    """The reference: a plain fp32 loop over time, written as the recurrence reads."""
    _check(q, k, v, beta, log_gate, state)
    dtype = v.dtype
    S = _initial(q, v, state)
    q, k, v, beta = q.float(), k.float(), v.float(), beta.float()
    ys = []
    for t in range(q.shape[2]):
        kt, bt = k[:, :, t], beta[:, :, t, None, None]
        S = S - bt * kt[..., :, None] * torch.einsum("bhd,bhde->bhe", kt, S)[..., None, :]
        if log_gate is not None:
            S = log_gate[:, :, t, None, None].float().exp() * S
        S = S + bt * kt[..., :, None] * v[:, :, t, None, :]
        ys.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], S))
    y = torch.stack(ys, dim=2) if ys else v[:, :, :0]
    return y.to(dtype), S


def delta_rule_step(q, k, v, beta, log_gate=None, state=None):
    """The recurrent form: a loop over the (few) new tokens, for decoding. Per token: decay, read the
    old value at k, write the beta-weighted correction, read at q."""
    _check(q, k, v, beta, log_gate, state)
    dtype = v.dtype
    S = _initial(q, v, state)
    q, k, v, beta = q.float(), k.float(), v.float(), beta.float()
    ys = []
    for t in range(q.shape[2]):
        if log_gate is not None:
            S = S * log_gate[:, :, t, None, None].float().exp()
        kt = k[:, :, t, None, :]  # [B, H, 1, Dk]
        u = beta[:, :, t, None, None] * (v[:, :, t, None, :] - kt @ S)  # [B, H, 1, Dv]
        S = S + kt.transpose(-1, -2) @ u
        ys.append((q[:, :, t, None, :] @ S)[:, :, 0])
    y = torch.stack(ys, dim=2) if ys else v[:, :, :0]
    return y.to(dtype), S


class _Chunked(NamedTuple):
    """The chunk-parallel quantities of the WY form (module docstring), [BH, N, C, *] fp32: the padded
    inputs and what the carry and the backward read. b and decay are None without a gate."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    beta: torch.Tensor  # [BH, N, C, 1]
    b: torch.Tensor | None  # in-chunk cumulative log gate, [BH, N, C, 1]
    decay: torch.Tensor | None  # exp(b_i - b_j) for j <= i, else 0, [BH, N, C, C]
    P: torch.Tensor  # (Q K^T) * decay, j <= i
    kk: torch.Tensor  # (K K^T) * decay, j < i: A = beta * kk
    t_inv: torch.Tensor  # (I + A)^-1
    u_v: torch.Tensor  # t_inv @ (beta V)
    w: torch.Tensor  # t_inv @ (beta gamma K)
    q_read: torch.Tensor  # gamma Q - P w: what reads the entering state
    k_out: torch.Tensor  # exp(b_C - b) K: each write decayed to the chunk's end

    def chunk_decays(self) -> torch.Tensor | None:
        """[BH, N]: how much each chunk decays the state it is handed, exp(b_C); None without a gate."""
        return None if self.b is None else self.b[:, :, -1, 0].exp()


def _chunks(q, k, v, beta, log_gate, C: int) -> _Chunked:
    """Pad to whole chunks of C (padded positions: beta = 0 and log gate = 0, so they change nothing) and
    compute every chunk's quantities at once."""
    B, H, T, _ = q.shape
    N = -(-T // C)
    Tp = N * C
    q, k, v = (pad_time(t.float(), Tp).reshape(B * H, N, C, t.shape[-1]) for t in (q, k, v))
    beta = pad_time(beta.float(), Tp).reshape(B * H, N, C, 1)
    incl, strict = lower_triangle(C, q.device), lower_triangle(C, q.device, -1)
    qk, kk = q @ k.transpose(-1, -2), k @ k.transpose(-1, -2)  # [BH, N, C, C]
    if log_gate is None:
        b = decay = None
        P, kk = qk.masked_fill_(~incl, 0.0), kk.masked_fill_(~strict, 0.0)
        k_beta, q_read_base, k_out = beta * k, q, k
    else:
        b = pad_time(log_gate.float(), Tp).reshape(B * H, N, C, 1).cumsum(dim=2)  # <= 0, non-increasing
        decay = (b - b.transpose(-1, -2)).masked_fill_(~incl, float("-inf")).exp_()  # exp(b_i - b_j), j <= i
        P, kk = qk.mul_(decay), kk.mul_(decay).masked_fill_(~strict, 0.0)
        gamma = b.exp()
        k_beta, q_read_base = (beta * gamma) * k, q * gamma  # the entering state, decayed to each position
        k_out = k * (b[:, :, -1:] - b).exp()
    # (I + A)^-1 once per chunk (a solve against I is cheaper than one against [beta V, beta gamma K])
    eye = torch.eye(C, device=q.device, dtype=q.dtype)
    t_inv = torch.linalg.solve_triangular(beta * kk + eye, eye.expand_as(kk), upper=False, unitriangular=True)
    u_v, w = t_inv @ (beta * v), t_inv @ k_beta  # the chunk's pseudo-values are U = u_v - w @ S0
    # reads of the entering state: q_read_base - P @ w as one batched multiply-add
    flat = (B * H * N, C, -1)
    q_read = torch.baddbmm(q_read_base.reshape(flat), P.reshape(flat), w.reshape(flat), alpha=-1.0)
    return _Chunked(q, k, v, beta, b, decay, P, kk, t_inv, u_v, w, q_read.view(w.shape), k_out)


def _carry(ch: _Chunked, S: torch.Tensor, keep: bool):
    """The sequential part: per chunk, read the entering state S [BH, Dk, Dv] (updated in place) and move
    it on: S <- chunk_decay S + K_C^T (u_v - w S). (I - K_C^T w) is never formed: [Dk, Dk] per chunk costs
    more memory traffic than the two thin products. Returns y [BH, N, C, Dv] (the chunks' own writes plus
    their reads of S) and, with `keep`, each chunk's entering state and pseudo-values [BH, N, *] for the
    backward."""
    BH, N, C, Dv = ch.u_v.shape
    decays = ch.chunk_decays()
    y_inter = ch.u_v.new_empty(N, BH, C, Dv)  # each chunk's reads of its entering state, added at the end
    states = S.new_empty(BH, N, *S.shape[1:]) if keep else None
    pseudo_all = torch.empty_like(ch.u_v) if keep else None
    k_t = ch.k_out.transpose(-1, -2)  # [BH, N, Dk, C]
    for n in range(N):
        if keep:
            states[:, n].copy_(S)
        torch.bmm(ch.q_read[:, n], S, out=y_inter[n])
        pseudo = torch.baddbmm(ch.u_v[:, n], ch.w[:, n], S, alpha=-1.0)
        if keep:
            pseudo_all[:, n].copy_(pseudo)
        if decays is not None:
            S.mul_(decays[:, n, None, None])
        S.baddbmm_(k_t[:, n], pseudo)
    y = (ch.P @ ch.u_v).add_(y_inter.transpose(0, 1))  # what the chunk's own writes give, plus the reads
    return y, states, pseudo_all


class _ChunkedDeltaRule(torch.autograd.Function):
    """The chunked form with its backward written out (autograd through the chunk loop costs about a third
    more): the chunk-parallel quantities and each chunk's entering state are kept from the forward."""

    @staticmethod
    def forward(ctx, q, k, v, beta, log_gate, S0, C):
        ch = _chunks(q, k, v, beta, log_gate, C)
        S = S0.reshape(-1, *S0.shape[-2:]).clone()
        y, states, pseudo = _carry(ch, S, keep=True)
        ctx.save_for_backward(*ch, states, pseudo)  # b and decay may be None
        ctx.shapes = q.shape, S0.shape
        return y, S

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dS_T):
        *chunked, states, pseudo = ctx.saved_tensors
        ch = _Chunked(*chunked)
        (B, H, T, _), s_shape = ctx.shapes
        grads = _chunked_backward(ch, states, pseudo, dy.float(), dS_T.float())
        dq, dk, dv, dbeta, dlog_gate, dS0 = grads
        unpad = [t.reshape(B, H, -1, *t.shape[3:])[:, :, :T] for t in (dq, dk, dv)]
        dbeta = dbeta.reshape(B, H, -1)[:, :, :T]
        dlog_gate = None if dlog_gate is None else dlog_gate.reshape(B, H, -1)[:, :, :T]
        return (*unpad, dbeta, dlog_gate, dS0.view(s_shape), None)


def _chunked_backward(ch: _Chunked, states, pseudo, dy, dS_T):
    """Gradients of the chunked form (module docstring's notation; ' is a transpose): the carry backwards
    chunk by chunk, then everything else for all chunks at once. dy [BH, N, C, Dv], dS_T [BH, Dk, Dv]."""
    BH, N, C, Dk = ch.q.shape
    Dv = ch.v.shape[-1]
    dy = dy.reshape(BH, N, C, Dv)
    decays = ch.chunk_decays()
    # the carry, backwards: S_{n+1} = g S_n + K_C' (u_v - w S_n), y_n += q_read S_n
    dpseudo, dstates = torch.empty_like(pseudo), torch.empty_like(states)
    dS = dS_T.reshape(BH, Dk, Dv).clone()
    for n in reversed(range(N)):
        dstates[:, n].copy_(dS)  # the gradient of the state leaving chunk n
        dp = torch.bmm(ch.k_out[:, n], dS)
        dpseudo[:, n].copy_(dp)
        if decays is not None:
            dS.mul_(decays[:, n, None, None])
        dS.baddbmm_(ch.q_read[:, n].transpose(-1, -2), dy[:, n]).baddbmm_(
            ch.w[:, n].transpose(-1, -2), dp, alpha=-1.0
        )
    # the products of the loop that need no order: for all chunks at once. Each temporary is let go after
    # its last use and sums accumulate in place, so the backward holds few [BH, N, C, *] tensors at a time.
    t = _transposed
    dq_read = dy @ t(states)
    dk_out = pseudo @ t(dstates)
    dg = None if decays is None else (dstates * states).sum((-1, -2)).mul_(decays)  # chunk decay exp(b_C)
    del dstates
    du_v = (t(ch.P) @ dy).add_(dpseudo)  # y = P u_v + ...
    dw = _add_product((dpseudo @ t(states)).neg_(), t(ch.P), dq_read, -1.0)  # pseudo = u_v - w S; q_read
    del dpseudo  # = gamma q - P w
    dP = _add_product(dy @ t(ch.u_v), dq_read, t(ch.w), -1.0)
    # u_v = t_inv (beta v), w = t_inv (beta gamma k): d(I + A) = -t_inv' (du_v u_v' + dw w')
    dxv = t(ch.t_inv) @ du_v
    del du_v
    dxk = t(ch.t_inv) @ dw
    del dw
    dA = _add_product(dxv @ t(ch.u_v), dxk, t(ch.w)).neg_().tril_(-1)  # A = beta * kk: strictly lower
    gamma = None if ch.b is None else ch.b.exp()
    dv = ch.beta * dxv
    dbeta = (ch.v * dxv).sum(-1, keepdim=True).add_((dA * ch.kk).sum(-1, keepdim=True))
    del dxv
    k_dxk = (ch.k * dxk).sum(-1, keepdim=True)
    dbeta += k_dxk if gamma is None else gamma * k_dxk
    dk = dxk.mul_(ch.beta if gamma is None else ch.beta * gamma)  # from w's beta gamma k
    # kk = (K K') * decay and P = (Q K') * decay; with a gate, d(decay) * decay first (for the gate below)
    dA.mul_(ch.beta)
    E = None if ch.decay is None else (dP * ch.P).addcmul_(dA, ch.kk)
    dkk = dA if ch.decay is None else dA.mul_(ch.decay)
    dqk = dP.tril_() if ch.decay is None else dP.mul_(ch.decay)
    dq = dqk @ ch.k
    if gamma is None:
        dq.add_(dq_read)
    else:
        dq.addcmul_(gamma, dq_read)
    dk = _add_product(_add_product(dk, dkk + t(dkk), ch.k), t(dqk), ch.q)
    del dkk, dqk
    if ch.b is None:
        return dq, dk.add_(dk_out), dv, dbeta, None, dS
    h = (ch.b[:, :, -1:] - ch.b).exp()  # [BH, N, C, 1]: k_out = h k
    dh = h * (ch.k * dk_out).sum(-1, keepdim=True)
    dk.addcmul_(h, dk_out)
    # the gate: every term reaches the cumulative log gate b; decay's exp(b_i - b_j) gives +row, -column
    db = E.sum(-1, keepdim=True) - E.sum(-2).unsqueeze(-1)
    db += gamma * ((ch.q * dq_read).sum(-1, keepdim=True) + ch.beta * k_dxk)  # gamma = exp(b)
    db -= dh  # h = exp(b_C - b)
    db[:, :, -1, 0] += dh.sum((-1, -2)) + dg
    dlog_gate = db.flip(2).cumsum(2).flip(2)  # b_i = sum of the log gates up to i
    return dq, dk, dv, dbeta, dlog_gate, dS


def _transposed(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """out += alpha * a @ b in place, for [BH, N, i, k] out (contiguous) and [BH, N, i, j] @ [BH, N, j, k]
    (either may be a transposed view); returns out."""
    flat = [x.reshape(-1, *x.shape[-2:]) for x in (a, b)]
    out.view(-1, *out.shape[-2:]).baddbmm_(*flat, alpha=alpha)
    return out


def delta_rule_chunked(q, k, v, beta, log_gate=None, state=None, chunk_size=None):
    """Chunked WY form, linear in T (see the module docstring): per-chunk triangular solves and
    products for all chunks at once, then a loop over chunks that only carries the state. Under autograd
    its backward is written out (`_ChunkedDeltaRule`). chunk_size None: CHUNK_INFERENCE without autograd,
    CHUNK_TRAINING with it."""
    _check(q, k, v, beta, log_gate, state)
    B, H, T, Dk = q.shape
    Dv, dtype = v.shape[-1], v.dtype
    S = _initial(q, v, state)
    if T == 0:
        return v[:, :, :0], S
    inputs = (q, k, v, beta, log_gate, S)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if chunk_size is None:
        chunk_size = CHUNK_TRAINING if training else CHUNK_INFERENCE
    C = min(chunk_size, round_up(T, _MIN_CHUNK))
    if training:
        y, S = _ChunkedDeltaRule.apply(q, k, v, beta, log_gate, S, C)
    else:  # the carry updates S in place: nothing keeps the old states without autograd
        S = S.reshape(B * H, Dk, Dv).clone()
        y, _, _ = _carry(_chunks(q, k, v, beta, log_gate, C), S, keep=False)
    y = y.reshape(B, H, -1, Dv)[:, :, :T]
    return y.to(dtype), S.view(B, H, Dk, Dv)


def delta_rule(q, k, v, beta, log_gate=None, state=None, chunk_size=None):
    """Dispatch: a few new tokens (decoding) take the step form, longer inputs the chunked form."""
    if q.shape[2] <= STEP_THRESHOLD:
        return delta_rule_step(q, k, v, beta, log_gate, state)
    return delta_rule_chunked(q, k, v, beta, log_gate, state, chunk_size)
