"""The few-op decoding step of the window hybrid (zoo.kernels.window_decode) against the general step form:
outputs and states over several tokens, plain and terraced windows, sinks, c, grouped heads, rows that
have seen different numbers of tokens (fewer than the window's slots), and the dispatcher's use of it."""

from __future__ import annotations

import pytest
import torch

from zoo.kernels import dispatch, native, window_decode
from zoo.kernels.dispatch import ENV_VAR
from zoo.kernels.window_decode import decode_fits, window_hybrid_decode
from zoo.kernels.window_hybrid import window_hybrid_chunked, window_hybrid_step

B, HKV, D, DV, F, W = 2, 2, 8, 5, 6, 8


def setup(groups, sinks, terraced, c, T0=30, steps=5, seed=0, dtype=torch.float32):
    """Inputs of T0 + steps tokens (k, v, fk once per key/value head) and the state after a prefill of T0
    tokens in which row 1 had T0 - 5 padding tokens, kept once per key/value head and repeated."""
    g = torch.Generator().manual_seed(seed)
    H, T = HKV * groups, T0 + steps
    q, fq = torch.randn(B, H, T, D, generator=g), torch.rand(B, H, T, F, generator=g)
    k, v = torch.randn(B, HKV, T, D, generator=g), torch.randn(B, HKV, T, DV, generator=g)
    fk = torch.rand(B, HKV, T, F, generator=g)
    a = torch.rand(H, generator=g) * 0.8 + 0.1
    factors = (a, 1 - a, None if c is None else c * a)
    mask = torch.ones(B, T0, dtype=torch.bool)
    mask[1, : T0 - 5] = False
    rep = [x[:, :, :T0].repeat_interleave(groups, 1) for x in (k, v, fk)]
    _, state = window_hybrid_chunked(
        q[:, :, :T0],
        rep[0],
        rep[1],
        fq[:, :, :T0],
        rep[2],
        *factors[:2],
        c=factors[2],
        window=W,
        terraced=terraced,
        key_mask=mask,
        sinks=sinks,
    )
    xs = [x.to(dtype) for x in (q, k, v)] + [fq, fk]
    return xs, factors, state


@pytest.mark.parametrize("terraced", [False, True], ids=["plain", "terraced"])
@pytest.mark.parametrize("sinks", [0, 3], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("groups", [1, 3], ids=["mha", "gqa"])
@pytest.mark.parametrize("c", [None, 0.3], ids=["no-c", "c"])
def test_decode_matches_the_step_form(terraced, sinks, groups, c):
    T0 = 30
    xs, (a, b, cc), state = setup(groups, sinks, terraced, c, T0=T0)
    grouped, ref = state.group_heads(groups), state
    kw = dict(window=W, terraced=terraced, c=cc)
    for t in range(T0, T0 + 5):
        q, k, v, fq, fk = (x[:, :, t : t + 1] for x in xs)
        rep = [x.repeat_interleave(groups, 1) for x in (k, v, fk)]
        y0, ref = window_hybrid_step(q, rep[0], rep[1], fq, rep[2], a, b, state=ref, sinks=sinks, **kw)
        assert decode_fits(grouped, None, 1, sinks)
        y1, grouped = window_hybrid_decode(q, k, v, fq, fk, a, b, state=grouped, **kw)
        torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    assert grouped.k.shape[1] == HKV
    for name in ("k", "v", "fk", "S", "z", "n") + (("sink_k", "sink_v") if sinks else ()):
        torch.testing.assert_close(getattr(grouped.repeat_heads(groups), name), getattr(ref, name))


@pytest.mark.parametrize("terraced", [False, True], ids=["plain", "terraced"])
def test_rows_at_one_position_share_masks_over_a_long_decode(terraced):
    """Every row at the same position (generate's case, masks made once per pattern): from 4 tokens seen
    (fewer than the slots; the sinks inside the window, then outside it) through several window edges."""
    g = torch.Generator().manual_seed(3)
    T0, steps, groups = 4, 30, 3
    H, T = HKV * groups, T0 + steps
    q, fq = torch.randn(B, H, T, D, generator=g), torch.rand(B, H, T, F, generator=g)
    k, v = torch.randn(B, HKV, T, D, generator=g), torch.randn(B, HKV, T, DV, generator=g)
    fk = torch.rand(B, HKV, T, F, generator=g)
    a = torch.rand(H, generator=g)
    rep = lambda x: x.repeat_interleave(groups, 1)  # noqa: E731
    kw = dict(window=W, terraced=terraced)
    _, ref = window_hybrid_chunked(
        q[:, :, :T0],
        rep(k[:, :, :T0]),
        rep(v[:, :, :T0]),
        fq[:, :, :T0],
        rep(fk[:, :, :T0]),
        a,
        1 - a,
        sinks=3,
        **kw,
    )
    grouped = ref.group_heads(groups)
    for t in range(T0, T):
        x = [z[:, :, t : t + 1] for z in (q, k, v, fq, fk)]
        y0, ref = window_hybrid_step(
            x[0], rep(x[1]), rep(x[2]), x[3], rep(x[4]), a, 1 - a, state=ref, sinks=3, **kw
        )
        y1, grouped = window_hybrid_decode(*x, a, 1 - a, state=grouped, **kw)
        torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5, msg=lambda m, t=t: f"token {t}: {m}")
    torch.testing.assert_close(grouped.repeat_heads(groups).S, ref.S)


def c_step_or_skip():
    if native.library("window_decode") is None:
        pytest.skip(f"zoo's C decode step is not available: {native.unavailable_reason('window_decode')}")


@pytest.mark.parametrize("terraced", [False, True], ids=["plain", "terraced"])
@pytest.mark.parametrize("sinks", [0, 3], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("groups", [1, 3], ids=["mha", "gqa"])
@pytest.mark.parametrize("c", [None, 0.3], ids=["no-c", "c"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kv_heads", [HKV, 1])  # 3 rows x 1 head on 2 threads: a query head an item
def test_the_c_step_is_the_pytorch_step(terraced, sinks, groups, c, threads, kv_heads):
    """fp32, rows at one position: the C step (it runs: checked) gives the PyTorch form's outputs and
    states token after token, from 4 tokens seen through several window edges, on 1 or 2 threads."""
    c_step_or_skip()
    g = torch.Generator().manual_seed(5)
    Bx, T0, steps = 3, 4, 26
    H, T = kv_heads * groups, T0 + steps
    q, fq = torch.randn(Bx, H, T, D, generator=g), torch.rand(Bx, H, T, F, generator=g)
    k, v = torch.randn(Bx, kv_heads, T, D, generator=g), torch.randn(Bx, kv_heads, T, DV, generator=g)
    fk = torch.rand(Bx, kv_heads, T, F, generator=g)
    a = torch.rand(H, generator=g)
    cc = None if c is None else c * a
    kw = dict(window=W, terraced=terraced, c=cc)
    rep = [x[:, :, :T0].repeat_interleave(groups, 1) for x in (k, v, fk)]
    _, state = window_hybrid_chunked(
        q[:, :, :T0], rep[0], rep[1], fq[:, :, :T0], rep[2], a, 1 - a, sinks=sinks, **kw
    )
    fused = reference = state.group_heads(groups)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for t in range(T0, T):
            x = [z[:, :, t : t + 1] for z in (q, k, v, fq, fk)]
            shut, lin = window_decode._masks(fused.n, fused.cached_tokens, W, terraced, sinks)
            assert window_decode._fused_step(*x, a, 1 - a, cc, fused, shut, lin, D**-0.5) is not None
            y1, fused = window_hybrid_decode(*x, a, 1 - a, state=fused, **kw)
            with native.disabled():
                y0, reference = window_hybrid_decode(*x, a, 1 - a, state=reference, **kw)
            torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5, msg=lambda m, t=t: f"token {t}: {m}")
            assert fused.position == t + 1 and fused.n.tolist() == [t + 1] * Bx  # the carried position
    finally:
        torch.set_num_threads(before)
    for name in ("k", "v", "fk", "S", "z", "n") + (("sink_k", "sink_v") if sinks else ()):
        torch.testing.assert_close(getattr(fused, name), getattr(reference, name), atol=1e-5, rtol=1e-5)


def test_the_c_step_appends_in_place_and_never_overwrites_a_state_still_in_use():
    """Decoding appends each token to the state's slot buffer (copied into a new one every ROOM tokens);
    the state's bytes, room included, stay the same token after token. Two steps from one state (a branch)
    both give the PyTorch form's results: the second finds the room taken and copies."""
    c_step_or_skip()
    room = window_decode.room_slots(2 * W)
    assert room == 2
    xs, (a, b, _), state = setup(3, 2, True, None, T0=30, steps=2 * room + 1)
    one = state.group_heads(3).select([0, 0])  # rows at one position
    tokens = [[x[:1].expand(2, *x.shape[1:])[:, :, t : t + 1] for x in xs] for t in range(30, xs[0].shape[2])]
    kw = dict(window=W, terraced=True)
    fused, buffers, sizes = one, [], []
    for x in tokens:
        y1, fused = window_hybrid_decode(*x, a, b, state=fused, **kw)
        buffers.append(fused.slots)
        sizes.append(fused.nbytes())
    assert len({id(buf) for buf in buffers}) == 3  # a new buffer at the first step, then every `room` steps
    assert all(buffers[i] is buffers[i + 1] for i in range(room - 1))
    slot_bytes = sum(x.numel() * x.element_size() for x in (one.k, one.v, one.fk)) // one.cached_tokens
    assert set(sizes) == {one.nbytes() + room * slot_bytes}  # the room is counted, and constant
    with native.disabled():
        reference = one
        for x in tokens:
            y0, reference = window_hybrid_decode(*x, a, b, state=reference, **kw)
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    for name in ("k", "v", "fk", "S", "z", "n"):
        torch.testing.assert_close(getattr(fused, name), getattr(reference, name), atol=1e-5, rtol=1e-5)
    # a branch: two different tokens from the same state, then one more step on each
    trunk = fused
    ya, branch_a = window_hybrid_decode(*tokens[0], a, b, state=trunk, **kw)
    yb, branch_b = window_hybrid_decode(*tokens[1], a, b, state=trunk, **kw)
    assert branch_a.slots is trunk.slots and branch_b.slots is not trunk.slots
    with native.disabled():
        ra, ref_a = window_hybrid_decode(*tokens[0], a, b, state=reference, **kw)
        rb, ref_b = window_hybrid_decode(*tokens[1], a, b, state=reference, **kw)
    torch.testing.assert_close((ya, yb), (ra, rb), atol=1e-5, rtol=1e-5)
    for name in ("k", "v", "fk", "S", "z"):
        torch.testing.assert_close(getattr(branch_a, name), getattr(ref_a, name), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(getattr(branch_b, name), getattr(ref_b, name), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(getattr(trunk, name), getattr(reference, name), atol=1e-5, rtol=1e-5)


def test_the_c_step_leaves_what_it_does_not_fit_to_pytorch():
    """Rows at different positions, or bf16 slots: no C step (the PyTorch form runs)."""
    c_step_or_skip()
    xs, (a, b, _), state = setup(3, 2, True, None)  # row 1 saw fewer tokens
    grouped = state.group_heads(3)
    q, k, v, fq, fk = (x[:, :, 30:31] for x in xs)
    shut, lin = window_decode._masks(grouped.n, grouped.cached_tokens, W, True, 2)
    assert shut.shape[0] == B
    assert window_decode._fused_step(q, k, v, fq, fk, a, b, None, grouped, shut, lin, 1.0) is None
    one = grouped.select([0, 0])
    shut, lin = window_decode._masks(one.n, one.cached_tokens, W, True, 2)
    q2, k2, v2, fq2, fk2 = (x[:1].expand(2, *x.shape[1:]) for x in (q, k, v, fq, fk))
    assert window_decode._fused_step(q2, k2, v2, fq2, fk2, a, b, None, one, shut, lin, 1.0) is not None
    assert window_decode._fused_step(q2.bfloat16(), k2, v2, fq2, fk2, a, b, None, one, shut, lin, 1.0) is None


def test_half_precision_slots():
    """bf16 q, k, v and slots (fp32 sums), as on a GPU: close to the fp32 step."""
    xs, (a, b, _), state = setup(3, 2, True, None)
    half = state.group_heads(3)
    half = type(half)(
        *(x.to(torch.bfloat16) for x in (half.k, half.v)),
        half.fk,
        half.S,
        half.z,
        half.n,
        half.window,
        half.terraced,
        half.sink_k.to(torch.bfloat16),
        half.sink_v.to(torch.bfloat16),
    )
    q, k, v, fq, fk = (x[:, :, 30:31] for x in xs)
    y, new = window_hybrid_decode(
        q.bfloat16(), k.bfloat16(), v.bfloat16(), fq, fk, a, b, window=W, terraced=True, state=half
    )
    rep = [x.repeat_interleave(3, 1) for x in (k, v, fk)]
    y0, _ = window_hybrid_step(
        q, rep[0], rep[1], fq, rep[2], a, b, window=W, terraced=True, state=state, sinks=2
    )
    assert y.dtype == torch.bfloat16 and new.k.dtype == torch.bfloat16 and new.S.dtype == torch.float32
    torch.testing.assert_close(y.float(), y0, atol=3e-2, rtol=3e-2)


def test_decode_fits_only_the_generate_case():
    _, _, state = setup(1, 3, False, None, T0=30)
    assert decode_fits(state, None, 1, 3)
    assert not decode_fits(None, None, 1, 3)  # no state
    assert not decode_fits(state, None, 2, 3)  # two tokens
    assert not decode_fits(state, torch.tensor([[True], [False]]), 1, 3)  # padding
    assert not decode_fits(state, None, 1, 0)  # sinks differ from the state's: the step form says why
    young = type(state)(
        state.k,
        state.v,
        state.fk,
        state.S,
        state.z,
        torch.tensor([30, 2]),
        W,
        False,
        state.sink_k,
        state.sink_v,
    )
    assert not decode_fits(young, None, 1, 3)  # row 1 has not seen its 3 sinks yet


def test_dispatcher_decodes_with_it_on_torch(monkeypatch):
    """One token with a state and no gradient: the dispatcher's torch path takes the few-op step, from
    keys given once per key/value head or repeated; its result is the step form's."""
    monkeypatch.setenv(ENV_VAR, "torch")
    calls = []
    real = dispatch.window_hybrid_decode
    monkeypatch.setattr(dispatch, "window_hybrid_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    xs, (a, b, _), state = setup(3, 2, False, None)
    q, k, v, fq, fk = (x[:, :, 30:31] for x in xs)
    rep = [x.repeat_interleave(3, 1) for x in (k, v, fk)]
    want, _ = window_hybrid_step(q, rep[0], rep[1], fq, rep[2], a, b, window=W, state=state, sinks=2)
    grouped = state.group_heads(3)
    for keys in ([k, v, fk], rep):
        y, new = dispatch.window_hybrid(
            q, keys[0], keys[1], fq, keys[2], a, b, window=W, state=grouped, sinks=2, kv_groups=3
        )
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
        assert new.k.shape[1] == HKV
    assert len(calls) == 2
    with torch.enable_grad():  # training through a one-token call keeps the general form
        dispatch.window_hybrid(
            q.requires_grad_(), k, v, fq, fk, a, b, window=W, state=grouped, sinks=2, kv_groups=3
        )
    assert len(calls) == 2
