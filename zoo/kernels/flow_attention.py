"""Causal Flow-Attention (Flowformer, Wu et al. 2022, arXiv:2202.06258), reconstructed for causal use.

Attention is read as a flow network: sources are the keys (carrying the values), sinks the queries,
and the capacity between sink i and source j is phi(q_i) . phi(k_j) with a non-negative feature map.
Causally, sink t sees the sources j <= t and source t has fed the sinks i <= t so far:

    I_t = phi(q_t) . sum_{j<=t} phi(k_j)                   incoming flow of sink t
    O_t = phi(k_t) . sum_{i<=t} phi(q_i)                   outgoing flow of source t
    Ih_t = phi(q_t) . sum_{j<=t} phi(k_j) / O_j            incoming flow once every source's outflow is
                                                           conserved to 1
    Oh_t = phi(k_t) . sum_{i<=t} phi(q_i) / I_i            outgoing flow once every sink's inflow is
                                                           conserved to 1
    c_{t,j} = t * exp(Oh_j) / sum_{j'<=t} exp(Oh_j')       source competition: a causal softmax over the
                                                           t sources seen, times t (mean weight 1)
    A_t = sigmoid(Ih_t)                                    sink allocation: a gate on the conserved inflow
    y_t = A_t * sum_{j<=t} (phi(q_t) . phi(k_j)) c_{t,j} v_j / I_t

(the paper's non-causal R = sigmoid(Ih) * (phi(Q) / I) (phi(K)^T (softmax(Oh) * n * V)) with every sum
over the whole sequence made a prefix sum; "t" counts real tokens).

Vectorized form: the five prefix sums are cumulative sums; the softmax over past sources is carried in
log space, lse_t = log sum_{j<=t} exp(Oh_j) (a log-cumsum-exp, stable for any Oh), so the competition
is the gated recurrence S_t = exp(lse_{t-1} - lse_t) S_{t-1} + phi(k_t)^T exp(Oh_t - lse_t) v_t (every
exponent <= 0) run by the shared kernel `linear_attention`, and y_t = A_t t phi(q_t) S_t / I_t.
The state is fixed in size: the running sums of phi(q), phi(k), phi(q)/I, phi(k)/O, S, lse, the count.

`flow_attention_naive` is the reference: a plain fp64 loop over time evaluating the formulas above
from the whole history (quadratic; for tests).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from zoo.kernels.linear_attention import LinearAttentionState, linear_attention

#: log-sum-exp of an empty set of sources (finite, so no inf - inf anywhere; Oh >= 0 for real tokens)
EMPTY = -1.0e4


class FlowState(NamedTuple):
    """Running sums (fp32): qsum, ksum, qn (phi(q)/I), kn (phi(k)/O) [B, H, F]; S [B, H, F, Dv] (the
    softmax-weighted source sum); lse [B, H]; n [B] real tokens seen."""

    qsum: torch.Tensor
    ksum: torch.Tensor
    qn: torch.Tensor
    kn: torch.Tensor
    S: torch.Tensor
    lse: torch.Tensor
    n: torch.Tensor

    @classmethod
    def empty(cls, B, H, F, Dv, device):
        z = lambda *s: torch.zeros(*s, device=device)  # noqa: E731
        return cls(
            z(B, H, F),
            z(B, H, F),
            z(B, H, F),
            z(B, H, F),
            z(B, H, F, Dv),
            torch.full((B, H), EMPTY, device=device),
            torch.zeros(B, dtype=torch.long, device=device),
        )


def flow_attention(fq, fk, v, state: FlowState | None = None, mask=None, eps: float = 1e-6):
    """fq, fk [B, H, T, F] non-negative features (fk already repeated to the query heads), v [B, H, T, Dv];
    mask [B, T] (1 real, 0 padding: padding adds nothing and gets output 0). Returns y (v's dtype) and
    the new FlowState."""
    B, H, T, F = fq.shape
    if fk.shape != fq.shape or v.shape[:3] != fq.shape[:3]:
        raise ValueError(
            f"expected fq, fk [B, H, T, F] alike and v [B, H, T, Dv]; got {tuple(fq.shape)}, "
            f"{tuple(fk.shape)}, {tuple(v.shape)}"
        )
    dtype = v.dtype
    st = FlowState.empty(B, H, F, v.shape[-1], fq.device) if state is None else state
    fq, fk, v = fq.float(), fk.float(), v.float()
    real = None if mask is None else mask.to(fq.device).bool()[:, None, :, None]
    if real is not None:
        fq, fk, v = fq * real, fk * real, v * real
    qsum = st.qsum[:, :, None] + fq.cumsum(2)  # [B, H, T, F]: prefix sums through t
    ksum = st.ksum[:, :, None] + fk.cumsum(2)
    inflow = (fq * ksum).sum(-1) + eps  # I_t [B, H, T]
    outflow = (fk * qsum).sum(-1) + eps  # O_t
    kn = st.kn[:, :, None] + (fk / outflow[..., None]).cumsum(2)
    qn = st.qn[:, :, None] + (fq / inflow[..., None]).cumsum(2)
    in_hat = (fq * kn).sum(-1)  # conserved incoming flow Ih_t
    out_hat = (fk * qn).sum(-1)  # conserved outgoing flow Oh_t
    if real is not None:
        out_hat = out_hat.masked_fill(~real[..., 0], EMPTY)
    lse = torch.logaddexp(st.lse[..., None], torch.logcumsumexp(out_hat, dim=2))  # [B, H, T]
    prev = torch.cat([st.lse[..., None], lse[..., :-1]], dim=2)
    log_gate = torch.where(
        prev > EMPTY / 2, prev - lse, torch.zeros_like(lse)
    )  # an empty state decays nothing
    weight = (out_hat - lse).exp()  # competition weight of source t among the sources so far, <= 1
    if real is not None:
        weight = weight * real[..., 0]
    steps = torch.ones(B, T, device=fq.device) if mask is None else real[:, 0, :, 0].float()
    count = st.n[:, None] + steps.cumsum(1)  # t: real tokens through t, [B, T]
    y, lin = linear_attention(
        fq, fk * weight[..., None], v, log_gate=log_gate, state=LinearAttentionState(st.S), normalize=False
    )
    y = y * (torch.sigmoid(in_hat) * count[:, None] / inflow)[..., None]
    if real is not None:
        y = y * real
    new = (
        FlowState(
            qsum[:, :, -1],
            ksum[:, :, -1],
            qn[:, :, -1],
            kn[:, :, -1],
            lin.S,
            lse[..., -1],
            st.n + steps.sum(1).long(),
        )
        if T
        else st
    )
    return y.to(dtype), new


def flow_attention_naive(fq, fk, v, mask=None, eps: float = 1e-6):
    """Reference: a plain loop over time (fp64), each step evaluating the formulas of the module docstring
    from the history (no log-sum-exp carry, no cumulative sums). Padding is skipped (output 0)."""
    B, H, T, F = fq.shape
    fq, fk, v = fq.double(), fk.double(), v.double()
    y = torch.zeros_like(v)
    for b in range(B):
        hist = []  # real positions so far
        inflow, outflow, out_hat = {}, {}, {}
        for t in range(T):
            if mask is not None and not mask[b, t]:
                continue
            hist.append(t)
            inflow[t] = (fq[b, :, t] * sum(fk[b, :, j] for j in hist)).sum(-1) + eps  # [H]
            outflow[t] = (fk[b, :, t] * sum(fq[b, :, i] for i in hist)).sum(-1) + eps
            # source t's conserved outflow uses the sinks i <= t (fixed from now on); sink t's inflow all j <=
            # t
            out_hat[t] = (fk[b, :, t] * sum(fq[b, :, i] / inflow[i][:, None] for i in hist)).sum(-1)
            in_hat = (fq[b, :, t] * sum(fk[b, :, j] / outflow[j][:, None] for j in hist)).sum(-1)
            compete = len(hist) * torch.softmax(
                torch.stack([out_hat[j] for j in hist], dim=1), dim=1
            )  # [H, n]
            capacity = torch.einsum("hf,hnf->hn", fq[b, :, t], fk[b][:, hist])
            y[b, :, t] = (
                torch.sigmoid(in_hat)[:, None]
                * torch.einsum("hn,hnd->hd", capacity * compete, v[b][:, hist])
                / inflow[t][:, None]
            )
    return y.float()
