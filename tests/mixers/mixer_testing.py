"""Shared by the mixer tests: the small layer shape, seeded inputs, running a mixer piece by piece, and the
registry-wide checks (test_registry.py) that every registered mixer passes with its `test_options`."""

from __future__ import annotations

import torch

from zoo.cache import map_state
from zoo.mixers import build_mixer, get_mixer

H, HKV, D, HIDDEN = 4, 2, 16, 32  # query heads, key/value heads, head dim, hidden size
#: the registry checks' sequence: past two of the kernels' 64-token chunks
LENGTH = 150
#: where the split check cuts it: single tokens (decoding steps) at the start and across a chunk edge, short
#: and long prefills starting inside a chunk, the last chunk alone
CUTS = [0, 1, 2, 3, 5, 9, 64, 65, 66, 67, 100, 129, 130, 150]
TOL = dict(atol=2e-5, rtol=1e-4)


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


def make_test_mixer(name, options=None, seed=0, perturb=0.1):
    """Registered mixer `name` with its `test_options` (or `options` instead), its parameters moved off their
    (often input-independent) start so that every learned part matters."""
    torch.manual_seed(seed)
    m = build_mixer(
        name, H, HKV, D, HIDDEN, 0, **(get_mixer(name).test_options if options is None else options)
    )
    with torch.no_grad():
        for p in m.parameters():
            p.add_(perturb * torch.randn_like(p))
    return m


def state_tensors(state):
    """The tensors of a mixer state, in a fixed order."""
    out = []
    map_state(lambda t: out.append(t) or t, state)
    return out


def assert_states_close(a, b):
    ta, tb = state_tensors(a), state_tensors(b)
    assert len(ta) == len(tb), f"states hold {len(ta)} and {len(tb)} tensors"
    for i, (x, y) in enumerate(zip(ta, tb)):
        torch.testing.assert_close(x, y, **TOL, msg=lambda m, i=i: f"state tensor {i}: {m}")


def check_split_and_carry(name, options=None, length=LENGTH, cuts=CUTS):
    """Mixer `name` run over `length` tokens cut at `cuts`, carrying the state, gives the outputs and the
    final
    state of one pass. Raises AssertionError where it does not."""
    m = make_test_mixer(name, options)
    ts = inputs(length)
    with torch.no_grad():
        y, state = m(*ts)
        y_pieces, state_pieces = run_pieces(m, ts, cuts)
    torch.testing.assert_close(y_pieces, y, **TOL)
    assert_states_close(state_pieces, state)


def with_padding(t, at, pads, seed):
    """[B, h, T, ...] (or x [B, T, hidden]) with `pads` garbage tokens inserted before token at[b] of row
    b."""
    dim = 2 if t.dim() == 4 else 1
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, i in enumerate(at):
        row = t[b : b + 1]
        garbage = 3.0 * torch.randn(row.narrow(dim, 0, pads).shape, generator=g)
        rows.append(torch.cat([row.narrow(dim, 0, i), garbage, row.narrow(dim, i, row.shape[dim] - i)], dim))
    return torch.cat(rows)


def check_padding_adds_nothing(name, options=None, length=100, pads=3):
    """Garbage padding (row 0 at the front, row 1 in the middle), in one pass and in pieces that cut through
    it (one piece of padding alone), gives the unpadded outputs on real tokens and a state that continues
    like the unpadded one."""
    m = make_test_mixer(name, options)
    ts, more = inputs(length), inputs(20, seed=5)
    at = [0, length // 2]
    padded = [with_padding(t, at, pads, seed=i) for i, t in enumerate(ts)]
    mask = torch.ones(2, length + pads, dtype=torch.long)
    for b, i in enumerate(at):
        mask[b, i : i + pads] = 0
    real = mask.bool()
    with torch.no_grad():
        y, state = m(*ts)
        y_next, _ = m(*more, state=state)
        for cuts in ([0, length + pads], [0, 2, at[1] + 1, length + pads]):
            ys, st = [], None
            for lo, hi in zip(cuts[:-1], cuts[1:]):
                y_part, st = m(*part(padded, lo, hi), state=st, mask=mask[:, lo:hi])
                ys.append(y_part)
            y_pad = torch.cat(ys, 2)
            for b in range(2):
                torch.testing.assert_close(y_pad[b][:, real[b]], y[b], **TOL)
            y_pad_next, _ = m(*more, state=st)
            torch.testing.assert_close(y_pad_next, y_next, **TOL)
