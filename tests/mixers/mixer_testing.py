"""Shared by the mixer tests: the small layer shape, seeded inputs, and running a mixer piece by piece."""

from __future__ import annotations

import torch

H, HKV, D, HIDDEN = 4, 2, 16, 32  # query heads, key/value heads, head dim, hidden size


def inputs(T, Bsz=2, seed=1, hkv=HKV):
    """Seeded q [B, H, T, D], k, v [B, hkv, T, D] and the layer input x [B, T, HIDDEN]."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(Bsz, h, T, D, generator=g) for h in (H, hkv, hkv))
    return q, k, v, torch.randn(Bsz, T, HIDDEN, generator=g)


def sl(t, lo, hi):
    """Tokens lo:hi of a [B, T, ...] or [B, h, T, ...] tensor ([B, T] masks and x are 2-3 dims)."""
    return t[:, lo:hi] if t.dim() == 3 else t[:, :, lo:hi]


def part(ts, lo, hi):
    """Tokens lo:hi of (q, k, v, x)."""
    q, k, v, x = ts
    return q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], x[:, lo:hi]


def run_pieces(m, ts, cuts, state=None):
    """Run mixer m over (q, k, v, x) cut at `cuts`, carrying the state: (y [B, H, T, D], final state)."""
    ys = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        y, state = m(*part(ts, lo, hi), state=state)
        ys.append(y)
    return torch.cat(ys, dim=2), state


def assert_bf16_inputs_follow_fp32(m, ts, memory_of):
    """bf16 (q, k, v, x) give bf16 outputs close to the fp32 ones, while the carried memory
    (`memory_of(state)`) stays fp32: a bf16 state would drift over a long decode."""
    with torch.no_grad():
        y32, _ = m(*ts)
        y16, state = m(*(t.bfloat16() for t in ts))
    assert y16.dtype == torch.bfloat16 and memory_of(state).dtype == torch.float32
    torch.testing.assert_close(y16.float(), y32, atol=5e-2, rtol=5e-2)
