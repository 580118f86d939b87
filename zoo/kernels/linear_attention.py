"""Gated linear attention: the recurrence most linear mixers share.

    S_t = diag(g_t) S_{t-1} + k_t^T v_t          y_t = q_t S_t
    z_t = g_t * z_{t-1} + k_t                    (normalize=True)  y_t = q_t S_t / (q_t . z_t + eps)

Shapes: q, k [B, H, T, Dk] (already feature-mapped; non-negative when normalizing), v [B, H, T, Dv].
The gate arrives as `log_gate` = log g <= 0 (finite): None (no decay), [B, H, T] (one scalar per head
and step) or [B, H, T, Dk] (one per key dimension). The state is a `LinearAttentionState` (S [B, H, Dk,
Dv], z [B, H, Dk] or None), always fp32 whatever the input dtype; the output has v's dtype.

Three forms with one signature `(q, k, v, log_gate=None, state=None, normalize=False, eps=1e-6)`:
`linear_attention_naive` (fp32 loop over time, the reference), `linear_attention_chunked` (chunks of
64, linear in T, the CPU training path) and `linear_attention_step` (the recurrent form for decoding).
`linear_attention` dispatches between the last two.

Padding needs no mask here: a caller zeroes k (and v) and sets log_gate to 0 at padded positions, so
they add nothing to the state and decay nothing.

Numerics of the chunked form: gates are summed in log space inside each chunk only (b = in-chunk
cumulative log gate), and no exponential of a large positive number is taken. Scalar gates form the
[C, C] decay exp(b_i - b_j), j <= i, directly. Per-key gates use exp(b_i) * exp(-b_j) when every chunk's
total log decay is above -30 (so exp(-b_j) < 1e13: exact to fp32 precision, one [C, C] product); with
stronger decay the chunk splits into 16-token sub-chunks: between sub-chunks q and k are rescaled
relative to the start of the query's sub-chunk (both factors <= 1), inside one the decay is formed per
element. Strong decay is therefore slower, never wrong.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from zoo.kernels._utils import lower_triangle, pad_time, round_up

__all__ = [
    "LinearAttentionState",
    "linear_attention",
    "linear_attention_chunked",
    "linear_attention_naive",
    "linear_attention_step",
]

#: at most this many new tokens go through the recurrent step form in `linear_attention`
STEP_THRESHOLD = 16
_SUB_CHUNK = 16
#: per-key gates: a chunk whose total log decay stays above -_FACTOR_LIMIT takes the factored fast path
_FACTOR_LIMIT = 30.0


class LinearAttentionState(NamedTuple):
    """What earlier tokens left: S [B, H, Dk, Dv] and, when normalizing, z [B, H, Dk]; both fp32."""

    S: torch.Tensor
    z: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------
# shared checks and the "augmented" state: with normalize=True a column of ones is appended to v, so
# the normalizer z rides along as the last column of S and one product gives numerator and denominator.


def _gate_kind(q: torch.Tensor, log_gate: torch.Tensor | None) -> str | None:
    if log_gate is None:
        return None
    if log_gate.shape == q.shape[:3]:
        return "scalar"
    if log_gate.shape == q.shape:
        return "key"
    raise ValueError(f"log_gate must be [B, H, T] {tuple(q.shape[:3])} or [B, H, T, Dk] {tuple(q.shape)}, "
                     f"got {tuple(log_gate.shape)}")


def _check(q, k, v, log_gate, state, normalize) -> str | None:
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k [B, H, T, Dk] and v [B, H, T, Dv] alike; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, _, Dk = q.shape
    if state is not None:
        if tuple(state.S.shape) != (B, H, Dk, v.shape[-1]):
            raise ValueError(f"state.S must be {(B, H, Dk, v.shape[-1])}, got {tuple(state.S.shape)}")
        if normalize and state.z is None:
            raise ValueError("normalize=True needs a state with its normalizer z (it was made without)")
    return _gate_kind(q, log_gate)


def _initial(q: torch.Tensor, v: torch.Tensor, state: LinearAttentionState | None, normalize: bool) -> torch.Tensor:
    """The augmented fp32 state [B, H, Dk, Dv (+1)]."""
    B, H, _, Dk = q.shape
    Dv = v.shape[-1]
    if state is None:
        return q.new_zeros(B, H, Dk, Dv + int(normalize), dtype=torch.float32)
    S = state.S.float()
    return torch.cat([S, state.z.float()[..., None]], dim=-1) if normalize else S


def _augment_v(v: torch.Tensor, normalize: bool) -> torch.Tensor:
    v = v.float()
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1) if normalize else v


def _finish(y: torch.Tensor, S: torch.Tensor, normalize: bool, eps: float, dtype: torch.dtype):
    if normalize:
        y = y[..., :-1] / (y[..., -1:] + eps)
        state = LinearAttentionState(S[..., :-1], S[..., -1])
    else:
        state = LinearAttentionState(S, None)
    return y.to(dtype), state


# ---------------------------------------------------------------------------------------------------


def linear_attention_naive(q, k, v, log_gate=None, state=None, normalize=False, eps=1e-6):
    """The reference: a plain fp32 loop over time, written as the recurrence reads."""
    kind = _check(q, k, v, log_gate, state, normalize)
    B, H, T, Dk = q.shape
    Dv, dtype = v.shape[-1], v.dtype
    q, k, v = q.float(), k.float(), v.float()
    S = q.new_zeros(B, H, Dk, Dv) if state is None else state.S.float()
    z = None
    if normalize:
        z = q.new_zeros(B, H, Dk) if state is None else state.z.float()
    ys = []
    for t in range(T):
        if kind is not None:
            g = log_gate[:, :, t].float().exp()  # [B, H] or [B, H, Dk]
            g = g[..., None] if kind == "key" else g[..., None, None]  # [B, H, Dk or 1, 1]
            S = g * S
            if normalize:
                z = g[..., 0] * z
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]
        y = torch.einsum("bhd,bhde->bhe", q[:, :, t], S)
        if normalize:
            z = z + k[:, :, t]
            y = y / ((q[:, :, t] * z).sum(-1, keepdim=True) + eps)
        ys.append(y)
    y = torch.stack(ys, dim=2) if ys else v.new_zeros(B, H, 0, Dv)
    return y.to(dtype), LinearAttentionState(S, z)


def linear_attention_step(q, k, v, log_gate=None, state=None, normalize=False, eps=1e-6):
    """The recurrent form: a loop over the (few) new tokens, for decoding."""
    kind = _check(q, k, v, log_gate, state, normalize)
    dtype = v.dtype
    S = _initial(q, v, state, normalize)
    q, k, v = q.float(), k.float(), _augment_v(v, normalize)
    ys = []
    for t in range(q.shape[2]):
        if kind is not None:
            g = log_gate[:, :, t].float().exp()
            S = S * (g[..., None] if kind == "key" else g[..., None, None])
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]
        ys.append((q[:, :, t, None, :] @ S)[:, :, 0])
    y = torch.stack(ys, dim=2) if ys else v[:, :, :0]
    return _finish(y, S, normalize, eps, dtype)


def _intra_key_gated(q, k, v, b, sub: int) -> torch.Tensor:
    """Intra-chunk output with per-key decays, safe for any decay. q, k, b [..., C, Dk] (b: the in-chunk
    cumulative log gate), v [..., C, Dv]. Returns sum_{j<=i} (q_i * exp(b_i - b_j)) . k_j v_j."""
    *lead, C, Dk = q.shape
    P = C // sub
    qs, ks, bs, vs = (t.reshape(*lead, P, sub, t.shape[-1]) for t in (q, k, b, v))
    # inside each sub-chunk: the decay per element, exp(b_i - b_j) for j <= i, one key column at a time
    cols = [(qs * (bs - bs[..., j:j + 1, :]).clamp(max=0).exp() * ks[..., j:j + 1, :]).sum(-1) for j in range(sub)]
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


def linear_attention_chunked(q, k, v, log_gate=None, state=None, normalize=False, eps=1e-6, chunk_size=64):
    """Chunked form, linear in T: the intra-chunk parts of all chunks at once (masked [C, C]
    products with gate decays), then a loop over chunks only to carry the state."""
    kind = _check(q, k, v, log_gate, state, normalize)
    B, H, T, Dk = q.shape
    dtype = v.dtype
    S = _initial(q, v, state, normalize)
    if T == 0:
        return _finish(_augment_v(v, normalize), S, normalize, eps, dtype)
    C = min(chunk_size, round_up(T, _SUB_CHUNK))
    N = -(-T // C)
    Tp = N * C
    q, k, v = (pad_time(t, Tp).reshape(B, H, N, C, t.shape[-1]) for t in (q.float(), k.float(), _augment_v(v, normalize)))
    Dva = v.shape[-1]

    if kind is None:
        y = (q @ k.transpose(-1, -2)).masked_fill(~lower_triangle(C, q.device), 0.0) @ v
        u = k.transpose(-1, -2) @ v  # each chunk's own contribution to the state, [B, H, N, Dk, Dva]
        chunk_decay = None
    else:
        g = pad_time(log_gate.float(), Tp).reshape(B, H, N, C, *log_gate.shape[3:])
        b = g.cumsum(dim=3)  # in-chunk cumulative log gate, <= 0 and non-increasing
        if kind == "scalar":
            decay = (b[..., :, None] - b[..., None, :]).masked_fill(~lower_triangle(C, q.device), float("-inf"))
            y = ((q @ k.transpose(-1, -2)) * decay.exp()) @ v
            b_last, b = b[..., -1:, None], b[..., None]  # [B, H, N, 1, 1], [B, H, N, C, 1]
            chunk_decay = b_last.exp()
            u = (k * (b_last - b).exp()).transpose(-1, -2) @ v  # decayed to the chunk's end
            q = q * b.exp()  # decay of the entering state up to each position
        else:
            b_last = b[..., -1:, :]
            chunk_decay = b_last.exp().transpose(-1, -2)  # [B, H, N, Dk, 1]
            u = (k * (b_last - b).exp()).transpose(-1, -2) @ v
            q_in = q * b.exp()
            if b_last.min() >= -_FACTOR_LIMIT:
                # mild decay (the usual case): exp(b_i - b_j) = exp(b_i) * exp(-b_j), and exp(-b_j) stays
                # below exp(_FACTOR_LIMIT), so one masked [C, C] product serves as without gates
                a = q_in @ (k * (-b).exp()).transpose(-1, -2)
                y = a.masked_fill(~lower_triangle(C, q.device), 0.0) @ v
            else:
                y = _intra_key_gated(q, k, v, b, _SUB_CHUNK if C % _SUB_CHUNK == 0 else C)
            q = q_in
    # the carry: the state entering chunk n reaches its queries; one small product per chunk (this
    # beats materializing all N entering states, [B, H, N, Dk, Dva], and one batched product)
    y_inter = []
    for n in range(N):
        y_inter.append(q[:, :, n] @ S)
        S = (S if chunk_decay is None else chunk_decay[:, :, n] * S) + u[:, :, n]
    y = y + torch.stack(y_inter, dim=2)

    y = y.reshape(B, H, Tp, Dva)[:, :, :T]
    return _finish(y, S, normalize, eps, dtype)


def linear_attention(q, k, v, log_gate=None, state=None, normalize=False, eps=1e-6, chunk_size=64):
    """Dispatch: a few new tokens (decoding) take the step form, longer inputs the chunked form."""
    if q.shape[2] <= STEP_THRESHOLD:
        return linear_attention_step(q, k, v, log_gate, state, normalize, eps)
    return linear_attention_chunked(q, k, v, log_gate, state, normalize, eps, chunk_size)
