"""The three forms of the (gated) delta rule agree: outputs, gradients and final state; and the rule
does what it is meant to (overwrite along a key, reduce to linear attention for orthogonal keys)."""

import pytest
import torch
import torch.nn.functional as F

from zoo.kernels.delta_rule import delta_rule, delta_rule_chunked, delta_rule_naive, delta_rule_step
from zoo.kernels.linear_attention import linear_attention_naive

B, H, D = 2, 2, 16
GATES = [False, True]


def make(T, gate=False, strength=0.5, seed=0, dtype=torch.float32, Dv=D):
    """q, k (L2-normalized, as callers give it), v, beta in (0, 1), log_gate <= 0 (or None)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    k = F.normalize(torch.randn(B, H, T, D, generator=g), dim=-1)
    v = torch.randn(B, H, T, Dv, generator=g)
    beta = torch.rand(B, H, T, generator=g) * 0.98 + 0.01
    log_gate = -strength * torch.rand(B, H, T, generator=g) if gate else None
    return [t if t is None else t.to(dtype) for t in (q, k, v, beta, log_gate)]


def random_state(seed=3, Dv=D):
    return torch.randn(B, H, D, Dv, generator=torch.Generator().manual_seed(seed))


def close(actual, expected, tol, atol=1e-6):
    """max |actual - expected| <= tol * max |expected| + atol (scale-aware)."""
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= tol * scale + atol, f"max error {err:.3g} > {tol} * {scale:.3g} + {atol}"


def run_with_grads(fn, inputs, state=None, **kw):
    """Forward, then backward of a fixed random functional of y and the final state. Gradients of
    q, k, v, beta, log_gate and (when given) the starting state."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    s0 = None if state is None else state.detach().clone().requires_grad_(True)
    y, S = fn(*leaves, state=s0, **kw)
    g = torch.Generator().manual_seed(123)
    loss = (y.float() * torch.randn(y.shape, generator=g)).sum()
    loss = loss + (S * torch.randn(S.shape, generator=g)).sum()
    loss.backward()
    grads = [None if t is None else t.grad for t in leaves] + [None if s0 is None else s0.grad]
    return y.detach(), S.detach(), grads


NAMES = "q k v beta log_gate state".split()


def assert_agree(fn, ref, inputs, state=None, tol=1e-4):
    y0, s0, g0 = run_with_grads(ref, inputs, state)
    y, s, grads = run_with_grads(fn, inputs, state)
    assert y.dtype == inputs[2].dtype and s.dtype == torch.float32
    close(y, y0, tol)
    close(s, s0, tol)
    for name, a, b in zip(NAMES, grads, g0):
        if b is None:
            assert a is None, name
            continue
        assert a is not None, name
        close(a, b, tol)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("T", [1, 63, 1000])
def test_forms_agree_outputs_grads_state(T, gate):
    inputs = make(T, gate, seed=T)
    forms = [delta_rule_chunked, delta_rule]
    if T <= 63:  # the step form is for decoding; it is a loop like the reference
        forms.append(delta_rule_step)
    for fn in forms:
        assert_agree(fn, delta_rule_naive, inputs)


@pytest.mark.parametrize("chunk_size", [16, 20, 64])
def test_weak_gates_carry_gradients_across_chunks(chunk_size):
    """Gates weak enough that a chunk's decay stays near 1 (log g ~ -0.005 a step): the gate's gradient
    through each chunk's carried state matters, at chunk sizes that do and do not divide T."""
    inputs = make(150, True, strength=0.01, seed=5)
    assert_agree(
        lambda *a, **kw: delta_rule_chunked(*a, chunk_size=chunk_size, **kw),
        delta_rule_naive,
        inputs,
        state=random_state(),
    )


@pytest.mark.parametrize("gate", GATES)
def test_starting_state(gate):
    inputs = make(100, gate, seed=4)
    for fn in (delta_rule_chunked, delta_rule_step):
        assert_agree(fn, delta_rule_naive, inputs, state=random_state())


@pytest.mark.parametrize("gate", GATES)
def test_chunk_sizes_and_odd_lengths(gate):
    inputs = make(130, gate, seed=1)
    y0, s0 = delta_rule_naive(*inputs)
    for chunk_size in (16, 20, 64, 128, 256):
        y, s = delta_rule_chunked(*inputs, chunk_size=chunk_size)
        close(y, y0, 1e-5)
        close(s, s0, 1e-5)
    for T in (2, 15, 16, 17, 65):  # shorter than a chunk, around the minimum chunk
        part = [t if t is None else t[:, :, :T] for t in inputs]
        y0, s0 = delta_rule_naive(*part)
        y, s = delta_rule_chunked(*part)
        close(y, y0, 1e-5)
        close(s, s0, 1e-5)


@pytest.mark.parametrize("gate", GATES)
def test_bf16_inputs(gate):
    inputs = make(300, gate, seed=2, dtype=torch.bfloat16)
    # the reference on the very same (bf16-rounded) values, in fp32
    y0, s0 = delta_rule_naive(*[t if t is None else t.float() for t in inputs])
    for fn in (delta_rule_chunked, delta_rule_step):
        leaves = [t if t is None else t.clone().requires_grad_(True) for t in inputs]
        y, s = fn(*leaves)
        assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
        close(y, y0, 2e-2)
        close(s, s0, 1e-4)  # the state is fp32 whatever the inputs
        y.float().sum().backward()
        for t in leaves:
            if t is not None:
                assert t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad.float()).all()


@pytest.mark.parametrize("gate", GATES)
def test_split_and_carry(gate):
    T = 1000
    inputs = make(T, gate, seed=5)
    y0, s0 = delta_rule_chunked(*inputs)

    def part(a, b):
        return [t if t is None else t[:, :, a:b] for t in inputs]

    for a in (1, 17, 64, 999):
        y1, s1 = delta_rule_chunked(*part(0, a))
        y2, s2 = delta_rule(*part(a, T), state=s1)
        close(torch.cat([y1, y2], dim=2), y0, 1e-4)
        close(s2, s0, 1e-4)
    # prefill, then decode token by token with the step form
    y1, s = delta_rule(*part(0, T - 5))
    ys = [y1]
    for t in range(T - 5, T):
        y, s = delta_rule_step(*part(t, t + 1), state=s)
        ys.append(y)
    close(torch.cat(ys, dim=2), y0, 1e-4)
    close(s, s0, 1e-4)


def test_strong_decay_is_finite_and_right():
    # log g ~ -5 per step (a chunk decays by ~e^-160) and beta near 1: no overflow, no NaN anywhere
    q, k, v, beta, lg = make(1000, True, strength=10.0, seed=6)
    beta = 0.999 - 0.01 * beta
    assert_agree(delta_rule_chunked, delta_rule_naive, [q, k, v, beta, lg], state=random_state())
    lg = torch.full_like(lg, -80.0)  # everything forgotten at every step: y_t = beta_t (q_t . k_t) v_t
    y, s = delta_rule_chunked(q, k, v, beta, lg)
    close(y, (beta * (q * k).sum(-1))[..., None] * v, 1e-5)


def test_padding_changes_nothing():
    # beta = 0 and log gate = 0 at some positions == those tokens absent (whatever their k and v)
    q, k, v, beta, lg = make(80, True, seed=8)
    keep = torch.ones(80, dtype=torch.bool)
    keep[:7] = False
    keep[40:45] = False
    beta2, lg2 = beta.clone(), lg.clone()
    beta2[:, :, ~keep] = 0
    lg2[:, :, ~keep] = 0
    s0 = random_state()
    y0, ref = delta_rule_naive(*(t[:, :, keep] for t in (q, k, v, beta, lg)), state=s0)
    for fn in (delta_rule_chunked, delta_rule_step):
        y, s = fn(q, k, v, beta2, lg2, s0)
        close(y[:, :, keep], y0, 1e-5)
        close(s, ref, 1e-5)


def test_overwrites_along_the_key():
    # beta = 1 replaces what the state held at key k by v: reading at q = k returns exactly v
    q, k, v, beta, _ = make(40, seed=9)
    y, s = delta_rule_chunked(q, k, v, beta)
    k_new, v_new = F.normalize(torch.randn(B, H, 1, D), dim=-1), torch.randn(B, H, 1, D)
    for fn in (delta_rule_step, delta_rule_chunked):
        y, _ = fn(k_new, k_new, v_new, torch.ones(B, H, 1), state=s)
        close(y, v_new, 1e-5)


def test_orthogonal_keys_reduce_to_linear_attention():
    # with mutually orthogonal keys nothing is overwritten: linear attention with values beta_t v_t
    T = D
    q, _, v, beta, lg = make(T, True, seed=10)
    k = torch.eye(D)[torch.randperm(D, generator=torch.Generator().manual_seed(0))].expand(B, H, T, D)
    y0, s0 = linear_attention_naive(q, k, beta[..., None] * v, log_gate=lg)
    y, s = delta_rule_chunked(q, k, v, beta, lg)
    close(y, y0, 1e-5)
    close(s, s0.S, 1e-5)


def test_empty_value_dim_and_errors():
    q, k, v, beta, lg = make(0, True)
    for fn in (delta_rule_naive, delta_rule_chunked, delta_rule_step, delta_rule):
        y, s = fn(q, k, v, beta, lg)
        assert y.shape == (B, H, 0, D) and s.shape == (B, H, D, D) and s.dtype == torch.float32
    inputs = make(70, True, seed=11, Dv=24)
    y0, s0 = delta_rule_naive(*inputs)
    y, s = delta_rule_chunked(*inputs)
    assert y.shape == (B, H, 70, 24) and s.shape == (B, H, D, 24)
    close(y, y0, 1e-5)
    close(s, s0, 1e-5)
    q, k, v, beta, lg = make(10, True)
    with pytest.raises(ValueError, match="log_gate"):
        delta_rule_chunked(q, k, v, beta, torch.zeros(B, H, 10, D))
    with pytest.raises(ValueError, match="beta"):
        delta_rule_chunked(q, k, v, beta[..., None])
    with pytest.raises(ValueError, match="state"):
        delta_rule_chunked(q, k, v, beta, state=torch.zeros(B, H, D, D + 1))


@pytest.mark.parametrize("gate", GATES)
def test_without_autograd_the_in_place_carry_leaves_the_given_state_alone(gate):
    # no autograd: the chunked carry updates its state in place, on its own copy
    q, k, v, beta, lg = make(150, gate, seed=9)
    s0 = random_state()
    kept = s0.clone()
    with torch.no_grad():
        y, s = delta_rule_chunked(q, k, v, beta, lg, state=s0)
    assert torch.equal(s0, kept) and s is not s0
    y0, s_ref = delta_rule_naive(q, k, v, beta, lg, state=s0)
    close(y, y0, 1e-5)
    close(s, s_ref, 1e-5)
