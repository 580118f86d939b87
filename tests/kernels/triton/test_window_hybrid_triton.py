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


def copy_state(st: WindowHybridState, grad=False) -> WindowHybridState:
    return WindowHybridState(
        *(leaf(getattr(st, n), grad) for n in STATE_FIELDS), st.n.clone(), st.window, st.terraced
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
    loss.backward()
    leaves = (
        xs
        + [f for f in factors if f is not None]
        + ([] if st is None else [getattr(st, n) for n in STATE_FIELDS])
    )
    return y, new, [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]


def assert_same(got, want, atol, rtol, what):
    y1, s1, g1 = got
    y0, s0, g0 = want
    torch.testing.assert_close(y1.float(), y0.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what} y: {m}")
    assert torch.equal(s1.n, s0.n) and s1.cached_tokens == s0.cached_tokens
    for n in STATE_FIELDS:
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


def padded_prefill_state(xs, a, b, T0, window, terraced):
    """A state after T0 tokens where row 1 had 9 padding tokens on the left: rows have seen different
    numbers of tokens, so the kernels' per-row positions and unused slots are exercised."""
    mask = torch.ones(B, T0, dtype=torch.bool, device=DEVICE)
    mask[1, :9] = False
    _, st = window_hybrid_chunked(
        *[x[:, :, :T0] for x in xs], a, b, window=window, terraced=terraced, key_mask=mask
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
