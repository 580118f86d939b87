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
[C, C] decay exp(b_i - b_j), j <= i, directly. Per-key gates use exp(b_i) * exp(-b_j) in a chunk whose
total log decay is above -30 in every head and key dimension (so exp(-b_j) < 1e13: exact to fp32
precision, one [C, C] product); a chunk with stronger decay splits into 16-token sub-chunks: between
sub-chunks q and k are rescaled relative to the start of the query's sub-chunk (both factors <= 1),
inside one the decay is formed per element. Strong decay is therefore slower, never wrong.

The chunked form has a backward of its own that recomputes instead of storing per-chunk states
(zoo.kernels._linear_chunked): memory O(T), no autograd graph per chunk. Its gate gradient comes from
dL/dG_t = q_t . dq_t - k_t . dk_t (G the cumulative log gate), summed from the end.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from zoo.kernels._linear_chunked import SUB_CHUNK, ChunkedLinearAttention
from zoo.kernels._utils import group_heads, pad_time, repeat_heads, round_up

__all__ = [
    "LinearAttentionState",
    "linear_attention",
    "linear_attention_chunked",
    "linear_attention_naive",
    "linear_attention_step",
]

#: at most this many new tokens go through the recurrent step form in `linear_attention`
STEP_THRESHOLD = 16


class LinearAttentionState(NamedTuple):
    """What earlier tokens left: S [B, H, Dk, Dv] and, when normalizing, z [B, H, Dk]; both fp32."""

    S: torch.Tensor
    z: torch.Tensor | None = None

    def repeat_heads(self, groups: int) -> LinearAttentionState:
        """Each head repeated `groups` times (zoo.kernels._utils.repeat_heads)."""
        return LinearAttentionState(*(repeat_heads(t, groups) for t in self))

    def group_heads(self, groups: int) -> LinearAttentionState:
        """One head per run of `groups` identical ones (zoo.kernels._utils.group_heads)."""
        return LinearAttentionState(*(group_heads(t, groups) for t in self))


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
    raise ValueError(
        f"log_gate must be [B, H, T] {tuple(q.shape[:3])} or [B, H, T, Dk] {tuple(q.shape)}, "
        f"got {tuple(log_gate.shape)}"
    )


def _check(q, k, v, log_gate, state, normalize) -> str | None:
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"expected q, k [B, H, T, Dk] and v [B, H, T, Dv] alike; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    B, H, _, Dk = q.shape
    if state is not None:
        if tuple(state.S.shape) != (B, H, Dk, v.shape[-1]):
            raise ValueError(f"state.S must be {(B, H, Dk, v.shape[-1])}, got {tuple(state.S.shape)}")
        if normalize and state.z is None:
            raise ValueError("normalize=True needs a state with its normalizer z (it was made without)")
    return _gate_kind(q, log_gate)


def _initial(
    q: torch.Tensor, v: torch.Tensor, state: LinearAttentionState | None, normalize: bool
) -> torch.Tensor:
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


def linear_attention_chunked(q, k, v, log_gate=None, state=None, normalize=False, eps=1e-6, chunk_size=64):
    """Chunked form, linear in T: one pass over chunks of C tokens (gates folded into q and k per chunk,
    the entering state read, the chunk's own masked [C, C] part added, the state updated in place), with a
    recomputing backward of its own (zoo.kernels._linear_chunked). No tensor of all chunks' scores or
    states is formed, so memory stays O(T) and working sets chunk-sized."""
    kind = _check(q, k, v, log_gate, state, normalize)
    B, H, T, Dk = q.shape
    Dv, dtype = v.shape[-1], v.dtype
    if T == 0:
        S = _initial(q, v, state, normalize)
        return _finish(_augment_v(v, normalize), S, normalize, eps, dtype)
    C = min(chunk_size, round_up(T, SUB_CHUNK))
    Tp = round_up(T, C)

    def flat(t):  # [B, H, T, .] -> [BH, Tp, .] fp32
        return pad_time(t.float(), Tp).flatten(0, 1)

    gate = None if kind is None else flat(log_gate)
    S0 = q.new_zeros(B * H, Dk, Dv, dtype=torch.float32) if state is None else state.S.float().flatten(0, 1)
    z0 = None
    if normalize:
        z0 = (
            q.new_zeros(B * H, Dk, 1, dtype=torch.float32)
            if state is None
            else state.z.float().flatten(0, 1)[..., None]
        )
    y, S, z = ChunkedLinearAttention.apply(flat(q), flat(k), flat(v), gate, S0, z0, kind, normalize, eps, C)
    y = y.view(B, H, Tp, Dv)[:, :, :T].to(dtype)
    return y, LinearAttentionState(S.view(B, H, Dk, Dv), None if z is None else z.view(B, H, Dk))


def linear_attention(q, k, v, log_gate=None, state=None, normalize=False, eps=1e-6, chunk_size=64):
    """Dispatch: a few new tokens (decoding) take the step form, longer inputs the chunked form."""
    if q.shape[2] <= STEP_THRESHOLD:
        return linear_attention_step(q, k, v, log_gate, state, normalize, eps)
    return linear_attention_chunked(q, k, v, log_gate, state, normalize, eps, chunk_size)
