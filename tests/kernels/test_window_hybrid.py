"""The sliding-window + linear hybrid kernel (LoLCATs): chunked and step forms against the fp32 loop."""

from __future__ import annotations

import pytest
import torch

from zoo.kernels.positions import token_positions, tokens_after
from zoo.kernels.window_hybrid import (
    state_len,
    window_hybrid,
    window_hybrid_chunked,
    window_hybrid_naive,
    window_hybrid_step,
    window_hybrid_weights,
)

B, H, D, DV, F = 2, 2, 8, 5, 6
#: attention sinks: none (the LoLCATs hybrid) and 3 (an odd count, fewer than every window here)
with_sinks = pytest.mark.parametrize("sinks", [0, 3], ids=["nosink", "sinks3"])


def make(T, seed=0, dtype=torch.float32, logit_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g) * logit_scale
    k = torch.randn(B, H, T, D, generator=g)
    v = torch.randn(B, H, T, DV, generator=g)
    fq = torch.randn(B, H, T, F, generator=g).softmax(-1)
    fk = torch.randn(B, H, T, F, generator=g).softmax(-1)
    a = torch.rand(H, generator=g) * 0.8 + 0.1
    xs = [t.to(dtype) for t in (q, k, v, fq, fk)]
    return xs, a, 1 - a


def run(fn, xs, a, b, grad=False, **kw):
    xs = [t.detach().clone().requires_grad_(grad) for t in xs]
    a, b = a.detach().clone().requires_grad_(grad), b.detach().clone().requires_grad_(grad)
    y, st = fn(*xs, a, b, **kw)
    grads = None
    if grad:
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
        (y * w).sum().backward()
        grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in (*xs, a, b)]  # None: unused
    return y, st, grads


def close_state(s1, s2, atol=1e-5, rtol=1e-5):
    assert s1.cached_tokens == s2.cached_tokens
    assert torch.equal(s1.n, s2.n)
    assert s1.sinks == s2.sinks
    for name in ("k", "v", "fk", "S", "z") + (("sink_k", "sink_v") if s1.sinks else ()):
        torch.testing.assert_close(
            getattr(s1, name).float(),
            getattr(s2, name).float(),
            atol=atol,
            rtol=rtol,
            msg=lambda m, name=name: f"state.{name}: {m}",
        )


@pytest.mark.parametrize("terraced", [False, True], ids=["plain", "terraced"])
@pytest.mark.parametrize("W", [16, 64])
@pytest.mark.parametrize("T", [1, 63, 200])
@with_sinks
def test_forms_agree_with_reference(terraced, W, T, sinks):
    xs, a, b = make(T, seed=T + W)
    _, s0 = assert_forms_agree(xs, a, b, window=W, terraced=terraced, sinks=sinks)
    assert s0.cached_tokens == state_len(W, terraced)


def assert_forms_agree(xs, a, b, **kw):
    """The chunked and step forms give the loop reference's outputs, gradients and state; returns its y,
    state."""
    y0, s0, g0 = run(window_hybrid_naive, xs, a, b, grad=True, **kw)
    for fn in (window_hybrid_chunked, window_hybrid_step):
        y, s, g = run(fn, xs, a, b, grad=True, **kw)
        torch.testing.assert_close(y, y0, atol=1e-5, rtol=1e-5)
        for name, gi, gr in zip(("q", "k", "v", "fq", "fk", "a", "b"), g, g0):
            torch.testing.assert_close(gi, gr, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")
        close_state(s, s0)
    return y0, s0


@pytest.mark.parametrize("terraced", [False, True], ids=["plain", "terraced"])
@with_sinks
def test_long_sequence_matches_reference(terraced, sinks):
    # many chunks (T = 1000, C = W = 64): the per-chunk key bands (views of one padded tensor) and their
    # gradients, against the loop reference
    xs, a, b = make(1000, seed=11)
    kw = dict(window=64, terraced=terraced, sinks=sinks)
    y0, s0, g0 = run(window_hybrid_naive, xs, a, b, grad=True, **kw)
    y, s, g = run(window_hybrid_chunked, xs, a, b, grad=True, **kw)
    torch.testing.assert_close(y, y0, atol=1e-5, rtol=1e-5)
    for name, gi, gr in zip(("q", "k", "v", "fq", "fk", "a", "b"), g, g0):
        torch.testing.assert_close(gi, gr, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")
    close_state(s, s0, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("terraced", [False, True], ids=["plain", "terraced"])
@pytest.mark.parametrize("W", [16, 64])
@pytest.mark.parametrize("masked", [False, True])
@with_sinks
def test_split_and_carry(terraced, W, masked, sinks):
    T = 150
    xs, a, b = make(T, seed=3)
    mask = None
    if masked:  # left padding in row 0, scattered padding in row 1
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[0, :11] = False
        mask[1] = torch.rand(T, generator=torch.Generator().manual_seed(5)) > 0.25
    kw = dict(window=W, terraced=terraced, sinks=sinks)
    y0, s0, _ = run(window_hybrid_naive, xs, a, b, key_mask=mask, **kw)
    yc, sc, _ = run(window_hybrid_chunked, xs, a, b, key_mask=mask, **kw)
    torch.testing.assert_close(yc, y0, atol=1e-5, rtol=1e-5)
    close_state(sc, s0)
    cuts = [0, 1, 17, 100, T]
    for forms in [
        (window_hybrid_chunked,) * 4,
        (window_hybrid_step,) * 4,
        (window_hybrid_step, window_hybrid_chunked, window_hybrid_step, window_hybrid_chunked),
        (window_hybrid_naive, window_hybrid_naive, window_hybrid_chunked, window_hybrid_naive),
    ]:
        st, ys = None, []
        for fn, lo, hi in zip(forms, cuts[:-1], cuts[1:]):
            piece = [t[:, :, lo:hi] for t in xs]
            y, st = fn(*piece, a, b, state=st, key_mask=None if mask is None else mask[:, lo:hi], **kw)
            ys.append(y)
        torch.testing.assert_close(torch.cat(ys, 2), y0, atol=1e-5, rtol=1e-5)
        close_state(st, s0)


@pytest.mark.parametrize("terraced", [False, True], ids=["plain", "terraced"])
@with_sinks
def test_state_stays_bounded(terraced, sinks):
    W, T = 16, 500
    xs, a, b = make(T, seed=7)
    kw = dict(window=W, terraced=terraced, sinks=sinks)
    _, s_whole, _ = run(window_hybrid_chunked, xs, a, b, **kw)
    limit = 2 * W if terraced else W
    assert s_whole.cached_tokens <= limit
    st, sizes = None, []
    for lo in range(0, T - 20, 40):  # prefill in pieces, then decode the last 20 tokens one at a time
        _, st = window_hybrid(*[t[:, :, lo : min(lo + 40, T - 20)] for t in xs], a, b, state=st, **kw)
        sizes.append(st.nbytes())
        assert st.cached_tokens <= limit
    for lo in range(T - 20, T):
        _, st = window_hybrid_step(*[t[:, :, lo : lo + 1] for t in xs], a, b, state=st, **kw)
        sizes.append(st.nbytes())
        assert st.cached_tokens <= limit
    assert len(set(sizes)) == 1  # the state's size does not grow with the context
    assert int(s_whole.n[0]) == T
    close_state(st, s_whole)


@pytest.mark.parametrize("terraced", [False, True], ids=["plain", "terraced"])
@pytest.mark.parametrize(
    "fn", [window_hybrid_chunked, window_hybrid_step, window_hybrid_naive], ids=["chunked", "step", "naive"]
)
@with_sinks
def test_padded_keys_contribute_nothing(terraced, fn, sinks):
    W, T = 16, 90
    xs, a, b = make(T, seed=11)
    g = torch.Generator().manual_seed(12)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, :7] = False
    # garbage at the padded positions, even in q: it must change nothing
    xs_bad = [torch.where(mask[:, None, :, None], t, 1e3 * torch.randn(t.shape, generator=g)) for t in xs]
    kw = dict(window=W, terraced=terraced, sinks=sinks)
    y, st, grads = run(fn, xs_bad, a, b, grad=True, key_mask=mask, **kw)
    assert torch.all(y[~mask[:, None, :].expand(B, H, T)] == 0)
    for t in grads[:5]:  # no gradient flows into padded positions
        assert torch.all(t.permute(0, 2, 1, 3)[~mask] == 0)
    for row in range(B):  # each row equals the same row with its padding removed
        keep = mask[row]
        sub = [t[row : row + 1, :, keep] for t in xs]
        ys, ss, _ = run(window_hybrid_naive, sub, a, b, **kw)
        torch.testing.assert_close(y[row : row + 1, :, keep], ys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st.S[row : row + 1], ss.S, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st.k[row : row + 1], ss.k)
        assert int(st.n[row]) == int(keep.sum())


def dense_reference(q, k, v, fq, fk, a, b, W, terraced, c=None, sinks=0):
    """Weights from the definition, key by key (positions = time indices; no padding). The sinks: softmax
    keys of every query, never linear ones."""
    T = q.shape[2]
    y = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for t in range(T):
        if terraced:
            win = [s for s in range(t + 1) if s // W >= t // W - 1 or s < sinks]
        else:
            win = [s for s in range(t + 1) if t - s < W or s < sinks]
        lin = [s for s in range(t + 1) if s not in win]
        s = (q[:, :, t : t + 1] @ k[:, :, win].transpose(-1, -2))[:, :, 0].double() * D**-0.5
        e = torch.exp(s - s.amax(-1, keepdim=True)) * a.double()[:, None]
        wl = (fq[:, :, t : t + 1] @ fk[:, :, lin].transpose(-1, -2))[:, :, 0].double() * b.double()[:, None]
        w = torch.cat([e, wl], -1)
        if c is not None:
            wc = (fq[:, :, t : t + 1] @ fk[:, :, win].transpose(-1, -2))[:, :, 0].double() * c.double()[
                :, None
            ]
            wc = wc * torch.tensor([s >= sinks for s in win], dtype=torch.float64)
            w = w + torch.cat([wc, torch.zeros_like(wl)], -1)
        y[:, :, t] = (w[..., None] * v[:, :, win + lin].double()).sum(2) / w.sum(-1, keepdim=True)
    return y


@pytest.mark.parametrize("terraced", [False, True], ids=["plain", "terraced"])
@with_sinks
def test_reference_matches_definition(terraced, sinks):
    W, T = 8, 40
    xs, a, b = make(T, seed=13)
    y_def = dense_reference(*xs, a, b, W, terraced, sinks=sinks)
    y, _, _ = run(window_hybrid_naive, xs, a, b, window=W, terraced=terraced, sinks=sinks)
    torch.testing.assert_close(y.double(), y_def, atol=1e-5, rtol=1e-5)
    # the branches alone: window softmax (a=1, b=0) and linear attention over all keys (a=0, b=c=1; with
    # sinks, over the keys after them, so the first queries need a sink-free window: start at `sinks`)
    one, zero = torch.ones(H), torch.zeros(H)
    for fa, fb, fc in ((one, zero, None), (zero, one, one)):
        y_def = dense_reference(*xs, fa, fb, W, terraced, c=fc, sinks=sinks)
        y, _ = window_hybrid_chunked(
            *xs, fa, fb, c=fc, window=W, terraced=terraced, chunk_size=16, sinks=sinks
        )
        torch.testing.assert_close(y[:, :, sinks:].double(), y_def[:, :, sinks:], atol=1e-5, rtol=1e-5)
    # the weights form: rows sum to one and reproduce the output
    wts = window_hybrid_weights(xs[0], xs[1], xs[3], xs[4], a, b, window=W, terraced=terraced, sinks=sinks)
    torch.testing.assert_close(wts.sum(-1), torch.ones(B, H, T))
    y, _ = window_hybrid_chunked(*xs, a, b, window=W, terraced=terraced, sinks=sinks)
    torch.testing.assert_close(wts @ xs[2], y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("terraced", [False, True], ids=["plain", "terraced"])
def test_bf16_loose(terraced):
    W, T = 16, 120
    xs, a, b = make(T, seed=17)
    y0, s0, _ = run(window_hybrid_naive, xs, a, b, window=W, terraced=terraced)
    xb = [t.bfloat16() for t in xs]
    for fn in (window_hybrid_chunked, window_hybrid_step):
        y, st, g = run(fn, xb, a, b, grad=fn is window_hybrid_chunked, window=W, terraced=terraced)
        assert y.dtype == torch.bfloat16 and st.k.dtype == torch.bfloat16 and st.S.dtype == torch.float32
        torch.testing.assert_close(y.float(), y0, atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(st.S, s0.S, atol=3e-2, rtol=3e-2)
        if g is not None:
            assert all(torch.isfinite(t.float()).all() for t in g)


def test_large_logits_stay_finite_and_exact():
    T = 130
    xs, a, b = make(T, seed=19, logit_scale=40.0)  # scores in the hundreds
    y0, _, g0 = run(window_hybrid_naive, xs, a, b, grad=True, window=16)
    y, _, g = run(window_hybrid_chunked, xs, a, b, grad=True, window=16)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in g)
    torch.testing.assert_close(y, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g[0], g0[0], atol=1e-4, rtol=1e-4)


def test_dispatch_and_errors():
    xs, a, b = make(10, seed=23)
    _, st = window_hybrid(*xs, a, b, window=4)
    y1, _ = window_hybrid(*[t[:, :, :1] for t in xs], a, b, window=4, state=st)
    y2, _ = window_hybrid_step(*[t[:, :, :1] for t in xs], a, b, window=4, state=st)
    assert torch.equal(y1, y2)
    with pytest.raises(ValueError, match="terraced"):
        window_hybrid(*xs, a, b, window=4, terraced=True, state=st)
    with pytest.raises(ValueError, match="sinks=0; called with .* sinks=2"):
        window_hybrid(*xs, a, b, window=4, state=st, sinks=2)
    with pytest.raises(ValueError, match="sinks must be >= 0"):
        window_hybrid_chunked(*xs, a, b, window=4, sinks=-1)
    with pytest.raises(ValueError, match="multiple of window"):
        window_hybrid_chunked(*xs, a, b, window=6, chunk_size=16)


def test_no_window_only_sinks():
    """window=0 with sinks: softmax over the sinks alone, linear attention over every other key (the query's
    own too). The forms agree (outputs, gradients, state), split and carry hold with padding, and the
    result is the definition's."""
    T = 150
    xs, a, b = make(T, seed=29)
    kw = dict(window=0, sinks=3)
    y0, s0 = assert_forms_agree(xs, a, b, **kw)
    assert s0.cached_tokens == 0 and s0.sinks == 3
    torch.testing.assert_close(
        y0[:, :, :40].double(),
        dense_reference(*(t[:, :, :40] for t in xs), a, b, 0, False, sinks=3),
        atol=1e-5,
        rtol=1e-5,
    )
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(31)) > 0.25
    y0, s0, _ = run(window_hybrid_naive, xs, a, b, key_mask=mask, **kw)
    st, ys = None, []
    for fn, lo, hi in zip(
        (window_hybrid_chunked, window_hybrid_step, window_hybrid_chunked, window_hybrid_step),
        (0, 2, 5, 120),
        (2, 5, 120, T),
    ):
        y, st = fn(*[t[:, :, lo:hi] for t in xs], a, b, state=st, key_mask=mask[:, lo:hi], **kw)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 2), y0, atol=1e-5, rtol=1e-5)
    close_state(st, s0)
    for bad in (dict(window=0), dict(window=0, sinks=2, terraced=True), dict(window=-1, sinks=2)):
        with pytest.raises(ValueError, match="window must be >= 1, or 0"):
            window_hybrid_chunked(*xs, a, b, **bad)


def test_token_positions_count_real_tokens_across_calls():
    """The one public position helper (which the window hybrid uses for its sinks): positions count real
    tokens only, continue from the tokens seen before, and padding repeats the previous real position."""
    mask = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1]])
    pos = token_positions(torch.tensor([0, 4]), mask, 6)
    assert pos.tolist() == [[-1, -1, 0, 1, 1, 2], [4, 5, 6, 7, 8, 9]]
    assert torch.equal(tokens_after(torch.tensor([0, 4]), mask, 6), torch.tensor([3, 10]))
    assert token_positions(torch.tensor([2, 0]), None, 3).tolist() == [[2, 3, 4], [0, 1, 2]]
    assert token_positions(5, None, 3).tolist() == [[5, 6, 7]] and tokens_after(5, None, 3) == 8
    assert token_positions(1, mask, 6)[0].tolist() == [0, 0, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="T = 5"):
        token_positions(0, mask, 5)
    # split anywhere, each call's positions continue where the previous call's count ended
    seen, parts = torch.tensor([0, 4]), []
    for lo, hi in ((0, 1), (1, 4), (4, 6)):
        parts.append(token_positions(seen, mask[:, lo:hi], hi - lo))
        seen = tokens_after(seen, mask[:, lo:hi], hi - lo)
    real = mask.bool()
    assert torch.equal(torch.cat(parts, 1)[real], pos[real])
