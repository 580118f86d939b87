"""The Triton window hybrid (zoo.kernels.triton) against the fp32 loop reference: outputs, gradients of
every differentiable input, final state; prefill, continuing a state, the decoding step, splitting.

Small shapes run everywhere (on the CPU through Triton's interpreter, see conftest.py); the tests
marked gpu run full-size shapes and only with CUDA.
"""

from __future__ import annotations

import pytest
import torch

from zoo.kernels.window_hybrid import (
    WindowHybridState,
    window_hybrid_chunked,
    window_hybrid_naive,
    window_hybrid_step,
)

pytest.importorskip("triton")
#: the GPU if there is one, else the CPU (the kernels then run in Triton's interpreter; see conftest.py)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

B, H, D, DV, F = 2, 2, 8, 5, 6  # odd sizes: every tile is padded and masked
# the interpreter's time grows with batch * heads: prefill tests take one row and two heads (per-head
# factors), state tests two rows and one head (rows that have seen different numbers of tokens)
PREFILL, STATEFUL = dict(batch=1, heads=2), dict(batch=2, heads=1)
STATE_FIELDS = ("k", "v", "fk", "S", "z")


def triton_forms():
    from zoo.kernels.triton.window_hybrid import window_hybrid_step_triton, window_hybrid_triton

    return window_hybrid_triton, window_hybrid_step_triton


def make(T, seed, dtype=torch.float32, d=D, dv=DV, f=F, batch=B, heads=H):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, heads, T, d, generator=g) for _ in range(2))
    v = torch.randn(batch, heads, T, dv, generator=g)
    fq, fk = (torch.randn(batch, heads, T, f, generator=g).softmax(-1) for _ in range(2))
    a = torch.rand(heads, generator=g) * 0.8 + 0.1
    xs = [t.to(DEVICE, dtype) for t in (q, k, v, fq, fk)]
    return xs, a.to(DEVICE), (1 - a).to(DEVICE)


def leaf(t: torch.Tensor, grad=True) -> torch.Tensor:
    return t.detach().clone().requires_grad_(grad and t.is_floating_point())


def state_fields(st: WindowHybridState) -> tuple[str, ...]:
    return STATE_FIELDS + (("sink_k", "sink_v") if st.sinks else ())


def copy_state(st: WindowHybridState, grad=False) -> WindowHybridState:
    sinks = [leaf(getattr(st, n), grad) for n in ("sink_k", "sink_v")] if st.sinks else []
    return WindowHybridState(
        *(leaf(getattr(st, n), grad) for n in STATE_FIELDS), st.n.clone(), st.window, st.terraced, *sinks
    )


def run(fn, xs, factors, state=None, grad=True, **kw):
    """y, new state and the gradients of (inputs, factors, incoming state) under a fixed random loss
    that also reads the new state (so its gradient paths are checked too)."""
    xs, factors = [leaf(t, grad) for t in xs], [None if f is None else leaf(f, grad) for f in factors]
    st = None if state is None else copy_state(state, grad)
    y, new = fn(*xs, *factors[:2], c=factors[2], state=st, **kw)
    if not grad:
        return y, new, None
    g = torch.Generator().manual_seed(7)
    loss = (y.float() * torch.randn(y.shape, generator=g).to(y.device)).sum()
    loss = (
        loss + 0.3 * new.S.sum() + 0.7 * new.z.sum() + 0.5 * new.k.float().sum() + 0.2 * new.fk.float().sum()
    )
    if new.sinks:
        loss = loss + 0.4 * new.sink_k.float().sum() + 0.6 * new.sink_v.float().sum()
    loss.backward()
    leaves = (
        xs
        + [f for f in factors if f is not None]
        + ([] if st is None else [getattr(st, n) for n in state_fields(st)])
    )
    return y, new, [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]


def assert_same(got, want, atol, rtol, what):
    y1, s1, g1 = got
    y0, s0, g0 = want
    torch.testing.assert_close(y1.float(), y0.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what} y: {m}")
    assert torch.equal(s1.n, s0.n) and s1.cached_tokens == s0.cached_tokens and s1.sinks == s0.sinks
    for n in state_fields(s0):
        torch.testing.assert_close(
            getattr(s1, n).float(),
            getattr(s0, n).float(),
            atol=atol,
            rtol=rtol,
            msg=lambda m, n=n: f"{what} state.{n}: {m}",
        )
    if g1 is not None:
        assert len(g1) == len(g0)
        for i, (a, b) in enumerate(zip(g1, g0)):
            torch.testing.assert_close(
                a.float(),
                b.float(),
                atol=atol * 4,
                rtol=rtol * 4,
                msg=lambda m, i=i: f"{what} gradient #{i}: {m}",
            )


def padded_prefill_state(xs, a, b, T0, window, terraced, sinks=0, pad=9):
    """A state after T0 tokens where row 1 had `pad` padding tokens on the left: rows have seen different
    numbers of tokens, so the kernels' per-row positions and unused slots are exercised."""
    mask = torch.ones(B, T0, dtype=torch.bool, device=DEVICE)
    mask[1, :pad] = False
    _, st = window_hybrid_chunked(
        *[x[:, :, :T0] for x in xs], a, b, window=window, terraced=terraced, key_mask=mask, sinks=sinks
    )
    return st


# (terraced, window, T, tile, state chunk, linear branch alone): windows below, at and not a multiple of
# the tile; one and two tiles per state chunk; T long enough for queries to read stored linear states,
# and not a multiple of anything
PREFILL_CASES = {
    "plain-W16": (False, 16, 45, 16, 16, False),
    "terraced-W16-R2": (True, 16, 70, 16, 32, False),
    "plain-W24-R2": (False, 24, 70, 16, 32, False),
    "terraced-W8-tile32": (True, 8, 63, 32, 32, False),
    "linear-branch-c": (False, 16, 45, 16, 16, True),
}


@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_matches_reference(case):
    terraced, W, T, tile, state_chunk, linear_only = PREFILL_CASES[case]
    window_hybrid_triton, _ = triton_forms()
    xs, a, b = make(T, seed=T + W, **PREFILL)
    factors = [torch.zeros_like(a), torch.ones_like(a), torch.ones_like(a)] if linear_only else [a, b, None]
    kw = dict(window=W, terraced=terraced)
    got = run(window_hybrid_triton, xs, factors, chunk_size=tile, state_chunk=state_chunk, **kw)
    assert_same(got, run(window_hybrid_naive, xs, factors, **kw), 1e-5, 1e-5, case)


@pytest.mark.parametrize("terraced", [False, True], ids=["plain", "terraced"])
def test_prefill_continues_a_state(terraced):
    """A second prefill after a (padded) first one: gradients reach the incoming state's tensors too."""
    W, T0, T1 = 16, 37, 30
    window_hybrid_triton, _ = triton_forms()
    xs, a, b = make(T0 + T1, seed=5, **STATEFUL)
    st = padded_prefill_state(xs, a, b, T0, W, terraced)
    rest = [x[:, :, T0:] for x in xs]
    kw = dict(window=W, terraced=terraced, state=st)
    got = run(window_hybrid_triton, rest, [a, b, None], chunk_size=16, state_chunk=16, **kw)
    assert_same(got, run(window_hybrid_naive, rest, [a, b, None], **kw), 1e-5, 1e-5, "continued")


@pytest.mark.parametrize("terraced", [False, True], ids=["plain", "terraced"])
def test_decode_step_matches_step_form(terraced):
    """The fused step: three tokens after a padded prefill, one of them padding in row 1, with c."""
    W, T0 = 16, 37
    _, window_hybrid_step_triton = triton_forms()
    xs, a, b = make(T0 + 3, seed=11, **STATEFUL)
    st = padded_prefill_state(xs, a, b, T0, W, terraced)
    mask = torch.ones(B, 3, dtype=torch.bool, device=DEVICE)
    mask[1, 1] = False
    new = [x[:, :, T0:] for x in xs]
    kw = dict(window=W, terraced=terraced, state=st, key_mask=mask)
    factors = [a, b, 0.5 * a]
    got = run(window_hybrid_step_triton, new, factors, grad=False, **kw)
    assert_same(got, run(window_hybrid_step, new, factors, grad=False, **kw), 1e-5, 1e-5, "step")


def test_prefill_then_decode_equals_whole_sequence():
    """Split and carry across the two Triton forms: a fresh decode, a prefill, then decoding steps."""
    W, T = 16, 53
    window_hybrid_triton, window_hybrid_step_triton = triton_forms()
    xs, a, b = make(T, seed=13, **PREFILL)
    y0, s0, _ = run(window_hybrid_naive, xs, [a, b, None], grad=False, window=W, terraced=True)
    parts, st = [], None
    for lo, hi, fn in (
        (0, 2, window_hybrid_step_triton),
        (2, 50, window_hybrid_triton),
        (50, 53, window_hybrid_step_triton),
    ):
        y, st, _ = run(
            fn, [x[:, :, lo:hi] for x in xs], [a, b, None], grad=False, window=W, terraced=True, state=st
        )
        parts.append(y)
    assert_same((torch.cat(parts, 2), st, None), (y0, s0, None), 1e-5, 1e-5, "split")


def loud_sinks(xs, sinks, factor=3.0):
    """The first `sinks` keys scaled up: the sinks then hold the window max of many queries, so the
    gradient of that max through a sink column is exercised too."""
    q, k, *rest = xs
    k = k.clone()
    k[:, :, :sinks] *= factor
    return [q, k, *rest]


# (terraced, window, T, tile, state chunk, sinks): sinks fewer than, equal to and more than a tile's 16
# columns would need; a window that holds the sinks for the first queries only
SINK_CASES = {
    "plain-W16-S4": (False, 16, 45, 16, 16, 4),
    "terraced-W8-S3-R2": (True, 8, 61, 16, 32, 3),
    "plain-W24-S1": (False, 24, 50, 16, 32, 1),
}


@pytest.mark.parametrize("case", SINK_CASES)
def test_prefill_with_sinks_matches_reference(case):
    terraced, W, T, tile, state_chunk, sinks = SINK_CASES[case]
    window_hybrid_triton, _ = triton_forms()
    xs, a, b = make(T, seed=T + sinks, **PREFILL)
    xs = loud_sinks(xs, sinks)
    kw = dict(window=W, terraced=terraced, sinks=sinks)
    got = run(window_hybrid_triton, xs, [a, b, None], chunk_size=tile, state_chunk=state_chunk, **kw)
    assert_same(got, run(window_hybrid_naive, xs, [a, b, None], **kw), 1e-5, 1e-5, case)


@pytest.mark.parametrize("terraced", [False, True], ids=["plain", "terraced"])
def test_prefill_with_sinks_continues_a_state(terraced):
    """A second prefill after a padded first one whose row 1 has seen fewer tokens than the sinks: that
    row's remaining sink slots fill from the new tokens; gradients reach the state's sink slots."""
    W, T0, T1, sinks = 8, 12, 30, 4
    window_hybrid_triton, _ = triton_forms()
    xs, a, b = make(T0 + T1, seed=6, **STATEFUL)
    xs = loud_sinks(xs, sinks)
    st = padded_prefill_state(xs, a, b, T0, W, terraced, sinks=sinks, pad=10)
    rest = [x[:, :, T0:] for x in xs]
    kw = dict(window=W, terraced=terraced, state=st, sinks=sinks)
    got = run(window_hybrid_triton, rest, [a, b, 0.3 * a], chunk_size=16, state_chunk=16, **kw)
    assert_same(got, run(window_hybrid_naive, rest, [a, b, 0.3 * a], **kw), 1e-5, 1e-5, "continued")


@pytest.mark.parametrize("terraced", [False, True], ids=["plain", "terraced"])
def test_decode_step_with_sinks_matches_step_form(terraced):
    """Decoding from a state whose row 1 has seen 1 token (it fills sink slots while decoding) and row 0
    many (its sinks are far outside the window), one step padding in row 1."""
    W, T0, sinks = 8, 20, 3
    _, window_hybrid_step_triton = triton_forms()
    xs, a, b = make(T0 + 4, seed=12, **STATEFUL)
    xs = loud_sinks(xs, sinks)
    st = padded_prefill_state(xs, a, b, T0, W, terraced, sinks=sinks, pad=19)
    mask = torch.ones(B, 4, dtype=torch.bool, device=DEVICE)
    mask[1, 1] = False
    new = [x[:, :, T0:] for x in xs]
    kw = dict(window=W, terraced=terraced, state=st, key_mask=mask, sinks=sinks)
    got = run(window_hybrid_step_triton, new, [a, b, None], grad=False, **kw)
    assert_same(got, run(window_hybrid_step, new, [a, b, None], grad=False, **kw), 1e-5, 1e-5, "step")


def test_sinks_prefill_then_decode_equals_whole_sequence():
    """Decoding from nothing through the sinks, a prefill, more decoding: the whole sequence's result."""
    W, T, sinks = 8, 45, 4
    window_hybrid_triton, window_hybrid_step_triton = triton_forms()
    xs, a, b = make(T, seed=14, **PREFILL)
    kw = dict(window=W, terraced=False, sinks=sinks)
    y0, s0, _ = run(window_hybrid_naive, xs, [a, b, None], grad=False, **kw)
    parts, st = [], None
    for lo, hi, fn in (
        (0, 2, window_hybrid_step_triton),
        (2, 42, window_hybrid_triton),
        (42, 45, window_hybrid_step_triton),
    ):
        y, st, _ = run(fn, [x[:, :, lo:hi] for x in xs], [a, b, None], grad=False, state=st, **kw)
        parts.append(y)
    assert_same((torch.cat(parts, 2), st, None), (y0, s0, None), 1e-5, 1e-5, "split")


def grouped(fn, groups):
    """fn (a PyTorch form, on query-head tensors) called with keys, values, key features and the state of
    grouped-query attention: [B, H / groups, ...] repeated to the H query heads, the new state grouped back.
    Autograd sums each group's gradients into its one key/value head, as the fused kernels must."""

    def call(q, k, v, fq, fk, a, b, state=None, **kw):
        rep = [x.repeat_interleave(groups, dim=1) for x in (k, v, fk)]
        st = None if state is None else state.repeat_heads(groups)
        y, new = fn(q, rep[0], rep[1], fq, rep[2], a, b, state=st, **kw)
        return y, new.group_heads(groups)

    return call


def grouped_inputs(T, seed, groups, heads, batch):
    """Inputs with `heads` query heads and heads / groups key/value heads (k, v, fk)."""
    xs, a, b = make(T, seed=seed, batch=batch, heads=heads)
    q, k, v, fq, fk = xs
    kv = heads // groups
    return [q, k[:, :kv].contiguous(), v[:, :kv].contiguous(), fq, fk[:, :kv].contiguous()], a, b


@pytest.mark.parametrize("sinks", [0, 3], ids=["no-sinks", "sinks"])
def test_grouped_query_prefill_matches_reference(sinks):
    """4 query heads on 2 key/value heads, terraced, with c: outputs, gradients (of the key/value heads'
    own tensors) and the state per key/value head."""
    window_hybrid_triton, _ = triton_forms()
    xs, a, b = grouped_inputs(44, seed=21, groups=2, heads=4, batch=1)
    xs = loud_sinks(xs, sinks)
    kw = dict(window=8, terraced=True, sinks=sinks)
    got = run(window_hybrid_triton, xs, [a, b, 0.4 * b], chunk_size=16, state_chunk=16, **kw)
    want = run(grouped(window_hybrid_naive, 2), xs, [a, b, 0.4 * b], **kw)
    assert got[1].k.shape[1] == 2
    assert_same(got, want, 1e-5, 1e-5, "grouped prefill")


def test_grouped_query_state_continues_and_decodes():
    """2 query heads on 1 key/value head: a second prefill after a padded first one (gradients reach the
    grouped state), then fused decoding steps against the PyTorch step form."""
    W, T0, T1, sinks = 8, 12, 20, 2
    window_hybrid_triton, window_hybrid_step_triton = triton_forms()
    xs, a, b = grouped_inputs(T0 + T1 + 3, seed=22, groups=2, heads=2, batch=2)
    mask = torch.ones(B, T0, dtype=torch.bool, device=DEVICE)
    mask[1, :10] = False
    _, st = grouped(window_hybrid_chunked, 2)(
        *[x[:, :, :T0] for x in xs], a, b, window=W, key_mask=mask, sinks=sinks
    )
    mid = [x[:, :, T0 : T0 + T1] for x in xs]
    kw = dict(window=W, sinks=sinks, state=st)
    got = run(window_hybrid_triton, mid, [a, b, None], chunk_size=16, state_chunk=16, **kw)
    assert_same(got, run(grouped(window_hybrid_naive, 2), mid, [a, b, None], **kw), 1e-5, 1e-5, "continued")
    last = [x[:, :, T0 + T1 :] for x in xs]
    kw["state"] = got[1]
    stepped = run(window_hybrid_step_triton, last, [a, b, None], grad=False, **kw)
    want = run(grouped(window_hybrid_step, 2), last, [a, b, None], grad=False, **kw)
    assert_same(stepped, want, 1e-5, 1e-5, "grouped step")


def test_grouped_query_decoding_from_nothing():
    """The fused step with no state yet makes one per key/value head (sinks filling as it goes)."""
    _, window_hybrid_step_triton = triton_forms()
    xs, a, b = grouped_inputs(3, seed=23, groups=2, heads=2, batch=2)
    kw = dict(window=8, sinks=2)
    got = run(window_hybrid_step_triton, xs, [a, b, None], grad=False, **kw)
    assert got[1].k.shape[1] == 1 and got[1].sink_k.shape[1] == 1
    assert_same(got, run(grouped(window_hybrid_step, 2), xs, [a, b, None], grad=False, **kw), 1e-5, 1e-5, "")


def test_half_precision_forward():
    """Half-precision q, k, v with fp32 features (what the mixers pass on a GPU): close to the fp32
    reference. bfloat16 on a GPU; float16 under the interpreter, whose tl.dot mishandles bfloat16."""
    window_hybrid_triton, _ = triton_forms()
    half = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
    xs, a, b = make(40, seed=17, **PREFILL)
    xs16 = [x.to(half) for x in xs[:3]] + xs[3:]
    y, st, _ = run(
        window_hybrid_triton, xs16, [a, b, None], grad=False, window=16, chunk_size=16, state_chunk=16
    )
    y0, s0, _ = run(window_hybrid_naive, [x.float() for x in xs16], [a, b, None], grad=False, window=16)
    assert y.dtype == half and st.k.dtype == half
    torch.testing.assert_close(y.float(), y0, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(st.S, s0.S, atol=1e-3, rtol=1e-3)


def test_rejects_what_it_does_not_take():
    window_hybrid_triton, _ = triton_forms()
    xs, a, b = make(20, seed=1)
    mask = torch.ones(B, 20, dtype=torch.bool, device=DEVICE)
    mask[0, :3] = False
    with pytest.raises(ValueError, match="padding"):
        window_hybrid_triton(*xs, a, b, window=8, key_mask=mask)
    with pytest.raises(TypeError, match="float64"):
        window_hybrid_triton(*[x.double() for x in xs], a, b, window=8)
    with pytest.raises(ValueError, match="power of two"):
        window_hybrid_triton(*xs, a, b, window=8, chunk_size=24)
    with pytest.raises(ValueError, match="multiple of the tile"):
        window_hybrid_triton(*xs, a, b, window=8, chunk_size=32, state_chunk=48)


# --------------------------------------------------------------------------------------------------
# full-size shapes: GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("terraced", [False, True], ids=["plain", "terraced"])
@pytest.mark.parametrize("dims", [(64, 64, 128), (128, 128, 256)], ids=["D64-F128", "D128-F256"])
def test_gpu_full_shapes_fp32(terraced, dims):
    """Llama-like heads (Hedgehog features are 2 * head_dim), default tiles, fp32 against the PyTorch
    chunked form on the same GPU (itself tested against the loop reference), T not a tile multiple."""
    d, dv, f = dims
    window_hybrid_triton, _ = triton_forms()
    xs, a, b = make(1000, seed=3, d=d, dv=dv, f=f, batch=2, heads=4)
    kw = dict(window=64, terraced=terraced)
    got = run(window_hybrid_triton, xs, [a, b, None], **kw)
    assert_same(got, run(window_hybrid_chunked, xs, [a, b, None], **kw), 1e-4, 1e-4, "gpu fp32")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_training_shapes_and_decode():
    """bf16 q, k, v and fp32 features at B=2, H=8, T=2048, D=64: prefill with gradients close to the
    fp32 computation, then 8 decoding steps against the PyTorch step form."""
    window_hybrid_triton, window_hybrid_step_triton = triton_forms()
    xs, a, b = make(2056, seed=4, d=64, dv=64, f=128, batch=2, heads=8)
    xs16 = [x.to(torch.bfloat16) for x in xs[:3]] + xs[3:]
    pre, post = [x[:, :, :2048] for x in xs16], [x[:, :, 2048:] for x in xs16]
    y, st, g = run(window_hybrid_triton, pre, [a, b, None], window=64)
    y0, s0, g0 = run(window_hybrid_chunked, [x.float() for x in pre], [a, b, None], window=64)
    torch.testing.assert_close(y.float(), y0, atol=5e-2, rtol=5e-2)
    for got, want in zip(g, g0):
        scale = want.abs().max().clamp(min=1e-6)
        assert ((got.float() - want).abs().max() / scale) < 5e-2
    y1, s1, _ = run(window_hybrid_step_triton, post, [a, b, None], grad=False, window=64, state=st)
    y2, s2, _ = run(window_hybrid_step, post, [a, b, None], grad=False, window=64, state=st)
    assert_same((y1, s1, None), (y2, s2, None), 2e-2, 2e-2, "gpu decode")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("terraced", [False, True], ids=["plain", "terraced"])
def test_gpu_sinks_and_grouped_heads_llama_shape(terraced):
    """Llama-3-8B's heads (32 query heads on 8 key/value heads, D = 128, Hedgehog F = 256) with 4 sinks,
    bf16 q, k, v and fp32 features, T = 1000: prefill with gradients, then 4 decoding steps, against the
    PyTorch forms in fp32 on the keys repeated to the query heads."""
    window_hybrid_triton, window_hybrid_step_triton = triton_forms()
    xs, a, b = grouped_inputs(1004, seed=8, groups=4, heads=32, batch=1)
    xs = [x.to(torch.bfloat16) if i < 3 else x for i, x in enumerate(loud_sinks(xs, 4, factor=2.0))]
    pre, post = [x[:, :, :1000] for x in xs], [x[:, :, 1000:] for x in xs]
    kw = dict(window=64, terraced=terraced, sinks=4)
    y, st, g = run(window_hybrid_triton, pre, [a, b, None], **kw)
    y0, s0, g0 = run(grouped(window_hybrid_chunked, 4), [x.float() for x in pre], [a, b, None], **kw)
    torch.testing.assert_close(y.float(), y0, atol=5e-2, rtol=5e-2)
    for got, want in zip(g, g0):
        scale = want.abs().max().clamp(min=1e-6)
        assert ((got.float() - want).abs().max() / scale) < 5e-2
    assert st.k.shape[1] == 8 and st.sink_k.shape[1] == 8
    y1, s1, _ = run(window_hybrid_step_triton, post, [a, b, None], grad=False, state=st, **kw)
    y2, s2, _ = run(grouped(window_hybrid_step, 4), post, [a, b, None], grad=False, state=st, **kw)
    assert_same((y1, s1, None), (y2, s2, None), 2e-2, 2e-2, "gpu grouped decode")
