"""The window hybrid with LoLA's sparse cache (zoo.kernels.sparse_cache): the run form against the per-token
reference (outputs and gradients, odd lengths, grouped heads, padding), split and carried, its two limits
(no cache: the terraced window hybrid; a cache that holds everything: causal softmax attention), the
eviction keeping the key the state recalls worst, and a state of constant size."""

from __future__ import annotations

import pytest
import torch

from zoo.kernels.softmax import causal_softmax_attention
from zoo.kernels.sparse_cache import (
    SparseHybridState,
    held_keys,
    self_recall_error,
    sparse_hybrid,
    sparse_hybrid_naive,
)
from zoo.kernels.window_hybrid import window_hybrid_naive

B, HKV, D, DV, F, W = 2, 2, 8, 6, 5, 4


def make(T, groups=2, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    H = HKV * groups
    xs = [
        torch.randn(B, H, T, D, generator=g),
        torch.randn(B, HKV, T, D, generator=g),
        torch.randn(B, HKV, T, DV, generator=g),
        torch.rand(B, H, T, F, generator=g),
        torch.rand(B, HKV, T, F, generator=g),
    ]
    a = torch.rand(H, generator=g) * 0.8 + 0.1
    return [x.requires_grad_(requires_grad) for x in xs], a, 1 - a


@pytest.mark.parametrize("T", [1, 7, 23, 41])
@pytest.mark.parametrize("groups", [1, 3], ids=["mha", "gqa"])
@pytest.mark.parametrize("sinks,cache", [(0, 2), (2, 3), (6, 1)], ids=["no-sinks", "sinks", "sinks>W"])
@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_runs_match_the_per_token_reference(T, groups, sinks, cache, relative):
    xs, a, b = make(T, groups)
    kw = dict(window=W, sinks=sinks, cache_size=cache, relative=relative)
    y, state = sparse_hybrid(*xs, a, b, **kw)
    torch.testing.assert_close(y, sparse_hybrid_naive(*xs, a, b, **kw), atol=1e-5, rtol=1e-5)
    assert state.n.tolist() == [T, T]


def test_gradients_match_the_reference():
    xs, a, b = make(29, requires_grad=True)
    kw = dict(window=W, sinks=2, cache_size=3)
    weights = torch.randn(B, HKV * 2, 29, DV)
    grads = []
    for form in (sparse_hybrid, sparse_hybrid_naive):
        out = form(*xs, a, b, **kw)
        y = out[0] if isinstance(out, tuple) else out
        grads.append(torch.autograd.grad((y * weights).sum(), xs))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_padding_is_dropped_and_split_calls_carry_the_state():
    T = 37
    xs, a, b = make(T, groups=2, seed=1)
    kw = dict(window=W, sinks=2, cache_size=3)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :5] = False  # left padding
    mask[1, 17:20] = False  # padding inside
    want = sparse_hybrid_naive(*xs, a, b, key_mask=mask, **kw)
    y, whole = sparse_hybrid(*xs, a, b, key_mask=mask, **kw)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    assert not y[~mask[:, None, :].expand(-1, y.shape[1], -1)].any()
    state, ys = None, []
    for lo, hi in [(0, 1), (1, 2), (2, 9), (9, 18), (18, 19), (19, 37)]:
        y_part, state = sparse_hybrid(
            *(x[:, :, lo:hi] for x in xs), a, b, state=state, key_mask=mask[:, lo:hi], **kw
        )
        ys.append(y_part)
    torch.testing.assert_close(torch.cat(ys, 2), y, atol=1e-6, rtol=1e-6)
    for got, want_t in zip(state.tensors(), whole.tensors()):
        torch.testing.assert_close(got, want_t, atol=1e-6, rtol=1e-6)


def test_without_a_cache_it_is_the_terraced_window_hybrid():
    xs, a, b = make(33, groups=2)
    q, k, v, fq, fk = xs
    rep = [x.repeat_interleave(2, 1) for x in (k, v, fk)]
    want, _ = window_hybrid_naive(q, rep[0], rep[1], fq, rep[2], a, b, window=W, terraced=True, sinks=2)
    y, state = sparse_hybrid(*xs, a, b, window=W, sinks=2, cache_size=0)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    assert state.cache_k.shape[2] == 0


def test_a_cache_that_holds_every_key_is_causal_softmax_attention():
    T = 30
    xs, a, b = make(T, groups=2)
    q, k, v, _, _ = xs
    y, state = sparse_hybrid(*xs, a, b, window=W, sinks=2, cache_size=T)
    want = causal_softmax_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    assert not state.S.any() and not state.z.any()  # nothing went to the linear state


def test_the_cache_keeps_the_key_the_state_recalls_worst():
    """A long run of near-identical filler pairs with one planted pair among them: the linear state recalls
    the filler well and the planted value badly, so the planted key is in the cache at the end (the cache
    is far smaller than what left the window)."""
    T, planted = 200, 37
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, 1, D, generator=g).expand(1, 1, T, D).clone() + 0.01 * torch.randn(1, 1, T, D)
    v = torch.ones(1, 1, T, DV)
    fk = torch.full((1, 1, T, F), 1.0 / F)
    k[0, 0, planted], v[0, 0, planted], fk[0, 0, planted] = 5.0, -7.0, torch.linspace(0.0, 1.0, F)
    q, fq = torch.randn(1, 1, T, D), torch.rand(1, 1, T, F)
    a = torch.tensor([0.5])
    _, state = sparse_hybrid(q, k, v, fq, fk, a, 1 - a, window=W, sinks=2, cache_size=3)
    assert any(torch.equal(state.cache_k[0, 0, i], k[0, 0, planted]) for i in range(3))
    err = self_recall_error(fk[0, 0], v[0, 0], state.S[0, 0], state.z[0, 0])
    assert err[planted] > 10 * err[100]


def test_held_keys_counts_what_the_state_holds_and_its_size_is_constant():
    kw = dict(window=W, sinks=2, cache_size=3)
    sizes = []
    for T in (5, 13, 64, 97):
        xs, a, b = make(T, groups=1, seed=T)
        _, state = sparse_hybrid(*xs, a, b, **kw)
        cached, linear = held_keys(T, W, 2, 3)
        assert (state.cache_k[:, :, cached:] == 0).all() and (state.cache_k[:, :, :cached] != 0).all()
        assert linear == max(0, max(0, (T // W - 1) * W) - 2 - 3)
        assert torch.equal(held_keys(torch.tensor([T]), W, 2, 3)[1], torch.tensor([linear]))
        sizes.append(sum(t.numel() for t in state.tensors()))
    assert len(set(sizes)) == 1


def test_a_state_of_other_options_is_refused():
    xs, a, b = make(9)
    _, state = sparse_hybrid(*xs, a, b, window=W, sinks=2, cache_size=3)
    assert isinstance(state, SparseHybridState)
    with pytest.raises(ValueError, match="cache_size=3; called with window=4, sinks=2, cache_size=5"):
        sparse_hybrid(*xs, a, b, window=W, sinks=2, cache_size=5, state=state)


def test_the_relative_error_does_not_keep_a_key_for_the_size_of_its_value():
    """Filler whose values all point one way, one of them 50 times longer; and one planted value that points
    elsewhere. The absolute error keeps the long filler value; the relative error keeps the planted one."""
    T, long_one, planted = 120, 30, 50
    k = torch.randn(1, 1, T, D, generator=torch.Generator().manual_seed(2))
    v = torch.ones(1, 1, T, DV)
    v[0, 0, long_one] *= 50.0
    v[0, 0, planted] = torch.tensor([1.0, -1.0] * (DV // 2))
    fk = torch.full((1, 1, T, F), 1.0 / F)
    q, fq, a = torch.randn(1, 1, T, D), torch.rand(1, 1, T, F), torch.tensor([0.5])
    kept = {}
    for relative in (False, True):
        _, state = sparse_hybrid(
            q, k, v, fq, fk, a, 1 - a, window=W, sinks=0, cache_size=1, relative=relative
        )
        kept[relative] = state.cache_k[0, 0, 0]
    assert torch.equal(kept[False], k[0, 0, long_one]) and torch.equal(kept[True], k[0, 0, planted])


@pytest.mark.parametrize("groups", [1, 3], ids=["mha", "gqa"])
@pytest.mark.parametrize("sinks,cache", [(0, 2), (2, 3), (6, 1)], ids=["no-sinks", "sinks", "sinks>W"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kv_heads", [HKV, 1])  # 3 rows x 1 head on 2 threads: a query head an item
def test_decoding_in_c_is_the_pytorch_form_token_after_token(groups, sinks, cache, threads, kv_heads):
    """One token at a time, rows at one position: the C step (it runs on every token past the sinks,
    checked; at a block end the eviction follows) and the PyTorch form give the same outputs and states,
    through several block ends and evictions; then a branch (two tokens from one state) gives both the
    PyTorch results."""
    from zoo.kernels import native

    if native.library("sparse_decode") is None:
        pytest.skip(f"no C kernel: {native.unavailable_reason('sparse_decode')}")
    T0, steps = 3, 26
    xs, a, b = make(T0 + steps + 1, groups)
    if kv_heads == 1:  # the first key/value head and its query heads
        xs, a, b = (
            [x[:, :groups] if x.shape[1] == HKV * groups else x[:, :1] for x in xs],
            a[:groups],
            b[:groups],
        )
    xs = [x[:1].expand(3, *x.shape[1:]).contiguous() for x in xs]  # 3 rows at one position
    kw = dict(window=W, sinks=sinks, cache_size=cache)
    _, fused = sparse_hybrid(*[x[:, :, :T0] for x in xs], a, b, **kw)
    reference, ran = fused, []
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for t in range(T0, T0 + steps):
            token = [x[:, :, t : t + 1] for x in xs]
            y1, fused = sparse_hybrid(*token, a, b, **kw, state=fused)
            ran.append(fused.position is not None)
            with native.disabled():
                y0, reference = sparse_hybrid(*token, a, b, **kw, state=reference)
            torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5, msg=lambda m, t=t: f"token {t}: {m}")
    finally:
        torch.set_num_threads(before)
    assert ran == [t >= sinks for t in range(T0, T0 + steps)]
    for got, want in zip(fused.tensors(), reference.tensors()):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    last = [x[:, :, T0 + steps : T0 + steps + 1] for x in xs]
    other = [x[:, :, :1] for x in xs]
    ya, _ = sparse_hybrid(*last, a, b, **kw, state=fused)
    yb, _ = sparse_hybrid(*other, a, b, **kw, state=fused)  # the slot is taken: cur_* is copied
    with native.disabled():
        ra, _ = sparse_hybrid(*last, a, b, **kw, state=reference)
        rb, _ = sparse_hybrid(*other, a, b, **kw, state=reference)
    torch.testing.assert_close((ya, yb), (ra, rb), atol=1e-5, rtol=1e-5)


def test_decoding_in_c_branches_at_a_block_end():
    """Two tokens from one state whose next token ends its block: each branch's C step (the eviction
    after it) gives the PyTorch form's output and state, and the first branch's state is left intact by
    the second (which writes a copy of the block, not the slot the first wrote)."""
    from zoo.kernels import native

    if native.library("sparse_decode") is None:
        pytest.skip(f"no C kernel: {native.unavailable_reason('sparse_decode')}")
    T0 = 3 * W - 1  # the next token completes block 2: block 1 leaves the window
    xs, a, b = make(T0 + 2, groups=3)
    kw = dict(window=W, sinks=2, cache_size=3)
    _, base = sparse_hybrid(*[x[:, :, : T0 - 1] for x in xs], a, b, **kw)
    _, base = sparse_hybrid(*[x[:, :, T0 - 1 : T0] for x in xs], a, b, **kw, state=base)  # a C step
    assert base.c_step is not None
    first, second = ([x[:, :, t : t + 1] for x in xs] for t in (T0, T0 + 1))
    ya, sa = sparse_hybrid(*first, a, b, **kw, state=base)
    kept = [x.clone() for x in sa.tensors()]
    yb, sb = sparse_hybrid(*second, a, b, **kw, state=base)
    assert sa.position == sb.position == base.position + 1  # both ran in C
    with native.disabled():
        ra, qa = sparse_hybrid(*first, a, b, **kw, state=base)
        rb, qb = sparse_hybrid(*second, a, b, **kw, state=base)
    torch.testing.assert_close((ya, yb), (ra, rb), atol=1e-5, rtol=1e-5)
    for got, want, before in zip(sa.tensors(), qa.tensors(), kept):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(got, before)
    for got, want in zip(sb.tensors(), qb.tensors()):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
