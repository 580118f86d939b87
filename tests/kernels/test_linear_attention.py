"""The three forms of gated linear attention agree: outputs, gradients and final state."""

import pytest
import torch

from zoo.kernels.linear_attention import (
    LinearAttentionState,
    linear_attention,
    linear_attention_chunked,
    linear_attention_naive,
    linear_attention_step,
)

B, H, D = 2, 2, 16
GATES = [None, "scalar", "key"]


def make(T, gate=None, normalize=False, strength=0.5, seed=0, dtype=torch.float32, Dv=D):
    """q, k, v, log_gate; q, k non-negative when normalizing (as feature maps make them)."""
    g = torch.Generator().manual_seed(seed)
    if normalize:
        q, k = (torch.rand(B, H, T, D, generator=g) for _ in range(2))
    else:
        q, k = (torch.randn(B, H, T, D, generator=g) / D**0.5 for _ in range(2))
    v = torch.randn(B, H, T, Dv, generator=g)
    log_gate = None
    if gate is not None:
        shape = (B, H, T) if gate == "scalar" else (B, H, T, D)
        log_gate = -strength * torch.rand(*shape, generator=g)
    return [t if t is None else t.to(dtype) for t in (q, k, v, log_gate)]


def close(actual, expected, tol, atol=1e-6):
    """max |actual - expected| <= tol * max |expected| + atol (scale-aware: unnormalized sums grow
    with T; atol covers quantities that are zero up to rounding, e.g. some gradients at T=1)."""
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= tol * scale + atol, f"max error {err:.3g} > {tol} * {scale:.3g} + {atol}"


def close_state(actual: LinearAttentionState, expected: LinearAttentionState, tol):
    assert actual.S.dtype == torch.float32
    close(actual.S, expected.S, tol)
    assert (actual.z is None) == (expected.z is None)
    if expected.z is not None:
        assert actual.z.dtype == torch.float32
        close(actual.z, expected.z, tol)


def run_with_grads(fn, inputs, normalize, state=None, **kw):
    """Forward, then backward of a fixed random functional of y and the final state."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    y, st = fn(*leaves, state=state, normalize=normalize, **kw)
    g = torch.Generator().manual_seed(123)
    loss = (y * torch.randn(y.shape, generator=g)).sum() + (st.S * torch.randn(st.S.shape, generator=g)).sum()
    if st.z is not None:
        loss = loss + (st.z * torch.randn(st.z.shape, generator=g)).sum()
    loss.backward()
    return (
        y.detach(),
        LinearAttentionState(st.S.detach(), None if st.z is None else st.z.detach()),
        [None if t is None else t.grad for t in leaves],
    )


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("T", [1, 63, 1000])
def test_forms_agree_outputs_grads_state(T, gate, normalize):
    inputs = make(T, gate, normalize, seed=T)
    y0, s0, g0 = run_with_grads(linear_attention_naive, inputs, normalize)
    forms = [linear_attention_chunked, linear_attention]
    if T <= 63:  # the step form is for decoding; it is a loop like the reference
        forms.append(linear_attention_step)
    for fn in forms:
        y, s, grads = run_with_grads(fn, inputs, normalize)
        assert y.dtype == torch.float32
        close(y, y0, 1e-4)
        close_state(s, s0, 1e-4)
        for name, a, b in zip("q k v log_gate".split(), grads, g0):
            if b is None:
                assert a is None
                continue
            assert a is not None, name
            # the chunked form gets the gate gradient as q.dq - k.dk summed from the end (two terms that
            # cancel where the true gradient is 0, e.g. normalized at T=1): zero up to ~1e-6 rounding
            close(a, b, 1e-4, atol=1e-5 if name == "log_gate" else 1e-6)


@pytest.mark.parametrize("gate", GATES)
def test_chunk_sizes_and_odd_lengths(gate):
    inputs = make(130, gate, normalize=True, seed=1)
    y0, s0 = linear_attention_naive(*inputs, normalize=True)
    for chunk_size in (16, 20, 64, 128, 256):
        y, s = linear_attention_chunked(*inputs, normalize=True, chunk_size=chunk_size)
        close(y, y0, 1e-5)
        close_state(s, s0, 1e-5)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("gate", GATES)
def test_bf16_inputs(gate, normalize):
    inputs = make(300, gate, normalize, seed=2, dtype=torch.bfloat16)
    # the reference on the very same (bf16-rounded) values, in fp32
    y0, s0 = linear_attention_naive(*[t if t is None else t.float() for t in inputs], normalize=normalize)
    for fn in (linear_attention_chunked, linear_attention_step):
        leaves = [t if t is None else t.clone().requires_grad_(True) for t in inputs]
        y, s = fn(*leaves, normalize=normalize)
        assert y.dtype == torch.bfloat16
        close(y, y0, 2e-2)
        close_state(s, s0, 1e-4)  # the state is fp32 whatever the inputs
        y.float().sum().backward()
        for t in leaves:
            if t is not None:
                assert t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad.float()).all()


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("gate", GATES)
def test_starting_state(gate, normalize):
    g = torch.Generator().manual_seed(3)
    state = LinearAttentionState(
        torch.randn(B, H, D, D, generator=g), torch.rand(B, H, D, generator=g) * 5 if normalize else None
    )
    inputs = make(100, gate, normalize, seed=4)
    y0, s0, g0 = run_with_grads(linear_attention_naive, inputs, normalize, state=state)
    for fn in (linear_attention_chunked, linear_attention_step):
        y, s, grads = run_with_grads(fn, inputs, normalize, state=state)
        close(y, y0, 1e-4)
        close_state(s, s0, 1e-4)
        for a, b in zip(grads, g0):
            if b is not None:
                close(a, b, 1e-4)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("gate", GATES)
def test_split_and_carry(gate, normalize):
    T = 1000
    inputs = make(T, gate, normalize, seed=5)
    y0, s0 = linear_attention_chunked(*inputs, normalize=normalize)

    def part(a, b):
        return [t if t is None else t[:, :, a:b] for t in inputs]

    for a in (1, 17, 64, 999):
        y1, s1 = linear_attention_chunked(*part(0, a), normalize=normalize)
        y2, s2 = linear_attention(*part(a, T), state=s1, normalize=normalize)
        close(torch.cat([y1, y2], dim=2), y0, 1e-4)
        close_state(s2, s0, 1e-4)
    # prefill, then decode token by token with the step form
    y1, s = linear_attention(*part(0, T - 5), normalize=normalize)
    ys = [y1]
    for t in range(T - 5, T):
        y, s = linear_attention_step(*part(t, t + 1), state=s, normalize=normalize)
        ys.append(y)
    close(torch.cat(ys, dim=2), y0, 1e-4)
    close_state(s, s0, 1e-4)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("gate", ["scalar", "key"])
def test_strong_decay_is_finite_and_right(gate, normalize):
    # log g ~ -5 per step: a chunk decays by ~e^-160, far beyond what exp(-cumsum) tricks survive
    inputs = make(1000, gate, normalize, strength=10.0, seed=6)
    y0, s0, g0 = run_with_grads(linear_attention_naive, inputs, normalize)
    y, s, grads = run_with_grads(linear_attention_chunked, inputs, normalize)
    close(y, y0, 1e-4)
    close_state(s, s0, 1e-4)
    for a, b in zip(grads, g0):
        if b is not None:
            close(a, b, 1e-4)


def test_mixed_decay_takes_safe_path():
    # mostly mild per-key gates with a few very strong steps: exercises the sub-chunked path where
    # the factored shortcut would overflow, on a sequence whose other chunks decay little
    q, k, v, lg = make(200, "key", normalize=True, strength=0.05, seed=7)
    lg[:, :, 70] = -80.0
    y0, s0 = linear_attention_naive(q, k, v, lg, normalize=True)
    y, s = linear_attention_chunked(q, k, v, lg, normalize=True)
    close(y, y0, 1e-5)
    close_state(s, s0, 1e-5)


def test_padding_adds_and_decays_nothing():
    # zeroed k, v and zero log gate at some positions == those tokens absent
    q, k, v, lg = make(80, "key", normalize=True, seed=8)
    keep = torch.ones(80, dtype=torch.bool)
    keep[:7] = False
    keep[40:45] = False
    k2, v2, lg2 = k.clone(), v.clone(), lg.clone()
    k2[:, :, ~keep] = 0
    v2[:, :, ~keep] = 0
    lg2[:, :, ~keep] = 0
    y, s = linear_attention_chunked(q, k2, v2, lg2, normalize=True)
    y0, s0 = linear_attention_naive(
        q[:, :, keep], k[:, :, keep], v[:, :, keep], lg[:, :, keep], normalize=True
    )
    close(y[:, :, keep], y0, 1e-5)
    close_state(s, s0, 1e-5)


def test_empty_and_errors():
    q, k, v, _ = make(0, normalize=True)
    for fn in (linear_attention_naive, linear_attention_chunked, linear_attention_step):
        y, s = fn(q, k, v, normalize=True)
        assert y.shape == (B, H, 0, D) and s.S.shape == (B, H, D, D) and s.z.shape == (B, H, D)
    q, k, v, _ = make(10)
    with pytest.raises(ValueError, match="log_gate"):
        linear_attention_chunked(q, k, v, log_gate=torch.zeros(B, H, 10, 3))
    with pytest.raises(ValueError, match="normalizer"):
        linear_attention_chunked(q, k, v, state=LinearAttentionState(torch.zeros(B, H, D, D)), normalize=True)


def test_value_dim_may_differ():
    inputs = make(70, "key", normalize=True, seed=9, Dv=24)
    y0, s0 = linear_attention_naive(*inputs, normalize=True)
    y, s = linear_attention_chunked(*inputs, normalize=True)
    assert y.shape == (B, H, 70, 24) and s.S.shape == (B, H, D, 24)
    close(y, y0, 1e-5)
    close_state(s, s0, 1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_decay_near_fast_path_limit(normalize):
    # per-key decay just inside the factored shortcut's bound (a chunk's total log decay ~ -29.8)
    q, k, v, _ = make(192, normalize=normalize, seed=10)
    lg = torch.full((B, H, 192, D), -0.465)
    y0, s0, g0 = run_with_grads(linear_attention_naive, [q, k, v, lg], normalize)
    y, s, grads = run_with_grads(linear_attention_chunked, [q, k, v, lg], normalize)
    close(y, y0, 1e-4)
    close_state(s, s0, 1e-4)
    for a, b in zip(grads, g0):
        close(a, b, 1e-4)
