"""The (gated) delta rule: DeltaNet and Gated DeltaNet.

    S_t = g_t (S_{t-1} - beta_t k_t (k_t^T S_{t-1})) + beta_t k_t v_t^T        y_t = q_t S_t

S is [Dk, Dv] per batch and head: the write replaces (a fraction beta_t of) what S held along k_t by
v_t, and the whole memory decays by the scalar g_t first. Shapes: q, k [B, H, T, Dk] (k L2-normalized
by the caller, so that I - beta k k^T is a contraction), v [B, H, T, Dv], beta [B, H, T] in (0, 1),
log_gate [B, H, T] = log g <= 0 (finite) or None (plain DeltaNet, g = 1). The state is a plain fp32
tensor [B, H, Dk, Dv] whatever the input dtype; the output has v's dtype.

Three forms with one signature `(q, k, v, beta, log_gate=None, state=None)`: `delta_rule_naive` (fp32
loop over time, written as the recurrence reads; the reference), `delta_rule_chunked` (chunks of 64,
linear in T, the CPU training path) and `delta_rule_step` (the recurrent form, for decoding).
`delta_rule` dispatches between the last two.

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
chunks in parallel before the short sequential loop over chunks. Gates enter only as
exp(b_i - b_j) with j <= i, exp(b_i) and exp(b_C - b_j): every exponent is <= 0, so no decay, however
strong, overflows; strong decay underflows to exact zeros, never to NaN.
"""

from __future__ import annotations

import torch

from zoo.kernels._utils import lower_triangle, pad_time, round_up

__all__ = ["delta_rule", "delta_rule_chunked", "delta_rule_naive", "delta_rule_step"]

#: at most this many new tokens go through the recurrent step form in `delta_rule`
STEP_THRESHOLD = 16
_MIN_CHUNK = 16


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


def delta_rule_chunked(q, k, v, beta, log_gate=None, state=None, chunk_size=64):
    """Chunked WY form, linear in T (see the module docstring): per-chunk triangular solves and
    products for all chunks at once, then a loop over chunks that only carries the state."""
    _check(q, k, v, beta, log_gate, state)
    B, H, T, Dk = q.shape
    Dv, dtype = v.shape[-1], v.dtype
    S = _initial(q, v, state)
    if T == 0:
        return v[:, :, :0], S
    C = min(chunk_size, round_up(T, _MIN_CHUNK))
    N = -(-T // C)
    Tp = N * C
    # padded tail positions have beta = 0 and log gate = 0: they change nothing
    q, k, v = (pad_time(t.float(), Tp).reshape(B, H, N, C, t.shape[-1]) for t in (q, k, v))
    beta = pad_time(beta.float(), Tp).reshape(B, H, N, C, 1)
    incl, strict = lower_triangle(C, q.device), lower_triangle(C, q.device, -1)

    qk, kk = q @ k.transpose(-1, -2), k @ k.transpose(-1, -2)  # [B, H, N, C, C]
    if log_gate is None:
        P = qk.masked_fill(~incl, 0.0)
        A = (beta * kk).masked_fill(~strict, 0.0)
        k_beta = beta * k
        q_in, k_out, chunk_decay = q, k, None
    else:
        b = pad_time(log_gate.float(), Tp).reshape(B, H, N, C, 1).cumsum(dim=3)  # <= 0, non-increasing
        decay = (b - b.transpose(-1, -2)).masked_fill(~incl, float("-inf")).exp()  # exp(b_i - b_j), j <= i
        P = qk * decay
        A = (beta * kk * decay).masked_fill(~strict, 0.0)
        k_beta = (beta * b.exp()) * k
        q_in = q * b.exp()  # the entering state, decayed up to each position
        k_out = k * (b[..., -1:, :] - b).exp()  # each write, decayed to the chunk's end
        chunk_decay = b[..., -1, :, None].exp()  # [B, H, N, 1, 1]

    # (I + A)^-1 once per chunk (a solve against I is cheaper than one against [beta V, beta gamma K])
    eye = torch.eye(C, device=q.device, dtype=q.dtype)
    t_inv = torch.linalg.solve_triangular(A + eye, eye.expand_as(A), upper=False, unitriangular=True)
    u_v, w = t_inv @ (beta * v), t_inv @ k_beta  # the chunk's pseudo-values are U = u_v - w @ S0
    y = P @ u_v  # what the chunk's own writes give, [B, H, N, C, Dv]
    # reads of the entering state, [B, H, N, C, Dk]: q_in - P @ w as one batched multiply-add
    q_read = torch.baddbmm(q_in.flatten(0, 2), P.flatten(0, 2), w.flatten(0, 2), alpha=-1.0).view(q_in.shape)
    k_t = k_out.transpose(-1, -2)  # [B, H, N, Dk, C]

    # the carry: per chunk, one read of the entering state and the transition
    # S <- chunk_decay S + K_C^T (u_v - w S); (I - K_C^T w) is never formed: [Dk, Dk] per chunk costs
    # more memory traffic than the two thin products. Chunks are taken by unbind, not indexing: under
    # autograd one gradient buffer gathers them all (indexing would allocate a full-size one per chunk).
    per_chunk = [t.flatten(0, 1).unbind(1) for t in (q_read, w, u_v, k_t)]
    decays = None if chunk_decay is None else chunk_decay.flatten(0, 1).unbind(1)
    S = S.flatten(0, 1)
    in_place = not (torch.is_grad_enabled() and any(t.requires_grad for t in (S, q_read, w, u_v, k_t)))
    if in_place:
        S = S.clone()  # the carry updates S in place: nothing keeps the old states without autograd
        # each chunk's reads of its entering state written straight into one chunk-major buffer, added
        # to y once at the end (no list of N tensors stacked into a copy)
        y_inter = y.new_empty(N, B * H, C, Dv)
    else:
        y_inter = []
    for n, (q_n, w_n, u_n, k_n) in enumerate(zip(*per_chunk)):
        if in_place:
            torch.bmm(q_n, S, out=y_inter[n])
        else:
            y_inter.append(torch.bmm(q_n, S))
        pseudo = torch.baddbmm(u_n, w_n, S, alpha=-1.0)
        if in_place:
            if decays is not None:
                S.mul_(decays[n])
            S.baddbmm_(k_n, pseudo)
        else:
            S = (S if decays is None else decays[n] * S) + torch.bmm(k_n, pseudo)
    if in_place:
        y = y.view(B * H, N, C, Dv).add_(y_inter.transpose(0, 1)).view(B, H, N, C, Dv)
    else:
        y = y + torch.stack(y_inter, dim=1).view(B, H, N, C, Dv)
    y = y.reshape(B, H, Tp, Dv)[:, :, :T]
    return y.to(dtype), S.view(B, H, Dk, Dv)


def delta_rule(q, k, v, beta, log_gate=None, state=None, chunk_size=64):
    """Dispatch: a few new tokens (decoding) take the step form, longer inputs the chunked form."""
    if q.shape[2] <= STEP_THRESHOLD:
        return delta_rule_step(q, k, v, beta, log_gate, state)
    return delta_rule_chunked(q, k, v, beta, log_gate, state, chunk_size)
