"""flash-linear-attention ops behind zoo's contracts (zoo.kernels.fla_backend) against the fp32 loop
references: outputs, gradients, final states, with initial states and every gate kind.

Triton's interpreter runs fla's fused recurrent kernels but not its chunked ones (they use Triton
features the interpreter lacks), so on the CPU only mode="recurrent" is checked; the chunked mode and
bfloat16 are checked by the gpu-marked tests.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.kernels.delta_rule import delta_rule_naive
from zoo.kernels.linear_attention import LinearAttentionState, linear_attention_naive

pytest.importorskip("fla")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def fla_forms():
    from zoo.kernels.fla_backend import delta_rule_fla, linear_attention_fla

    return linear_attention_fla, delta_rule_fla


def linear_inputs(gate, normalize, T=20, B=1, H=2, K=8, V=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, K, generator=g).softmax(-1) for _ in range(2))
    v = torch.randn(B, H, T, V, generator=g)
    log_gate = {
        None: None,
        "scalar": F.logsigmoid(torch.randn(B, H, T, generator=g) + 3),
        "key": F.logsigmoid(torch.randn(B, H, T, K, generator=g) + 3),
    }[gate]
    state = LinearAttentionState(
        torch.randn(B, H, K, V, generator=g).abs(), torch.rand(B, H, K, generator=g) if normalize else None
    )
    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return [move(t) for t in (q, k, v, log_gate)], LinearAttentionState(*(move(t) for t in state))


def delta_inputs(gated, T=20, B=1, H=2, K=8, V=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (F.normalize(torch.randn(B, H, T, K, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(B, H, T, V, generator=g)
    beta = torch.rand(B, H, T, generator=g)
    log_gate = F.logsigmoid(torch.randn(B, H, T, generator=g) + 3) if gated else None
    state = torch.randn(B, H, K, V, generator=g)
    return [None if t is None else t.to(DEVICE) for t in (q, k, v, beta, log_gate)], state.to(DEVICE)


def with_grads(fn, xs, *args, grad=True, **kw):
    """Run fn on fresh leaves of xs; return (y, state, gradients of the non-None inputs)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(grad) for t in xs]
    y, state = fn(*leaves, *args, **kw)
    if not grad:
        return y, state, []
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.device)
    S = state.S if isinstance(state, LinearAttentionState) else state
    ((y.float() * w).sum() + 0.1 * S.sum()).backward()
    return y, state, [t.grad for t in leaves if t is not None]


def assert_close_all(got, want, atol, rtol):
    for a, b in zip(got, want, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    "gate, normalize",
    [("key", True), ("scalar", True), (None, False)],
    ids=["gla-normalized", "simple-gla-normalized", "no-gate"],
)
def test_linear_attention_recurrent(gate, normalize):
    linear_attention_fla, _ = fla_forms()
    xs, state = linear_inputs(gate, normalize)
    y, s, g = with_grads(linear_attention_fla, xs, state, normalize, mode="recurrent")
    y0, s0, g0 = with_grads(linear_attention_naive, xs, state, normalize)
    assert y.dtype == xs[2].dtype
    assert_close_all([y, s.S, s.z, *g], [y0, s0.S, s0.z, *g0], atol=1e-5, rtol=1e-4)


def test_delta_rule_recurrent():
    _, delta_rule_fla = fla_forms()
    xs, state = delta_inputs(gated=False)
    y, s, g = with_grads(delta_rule_fla, xs, state, mode="recurrent")
    y0, s0, g0 = with_grads(delta_rule_naive, xs, state)
    assert_close_all([y, s, *g], [y0, s0, *g0], atol=1e-5, rtol=1e-4)


def test_gated_delta_rule_recurrent_is_inference_only():
    _, delta_rule_fla = fla_forms()
    xs, state = delta_inputs(gated=True)
    y, s, _ = with_grads(delta_rule_fla, xs, state, grad=False, mode="recurrent")
    y0, s0, _ = with_grads(delta_rule_naive, xs, state, grad=False)
    assert_close_all([y, s], [y0, s0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no backward"):
        delta_rule_fla(*[t.requires_grad_() for t in xs], state, mode="recurrent")


def test_adapter_errors():
    linear_attention_fla, delta_rule_fla = fla_forms()
    xs, state = delta_inputs(gated=False)
    with pytest.raises(ValueError, match="float32"):
        delta_rule_fla(*xs, state, mode="chunk")
    with pytest.raises(ValueError, match="mode"):
        delta_rule_fla(*xs, state, mode="parallel")
    lin, lstate = linear_inputs("key", normalize=True)
    with pytest.raises(ValueError, match="normalizer z"):
        linear_attention_fla(*lin, LinearAttentionState(lstate.S, None), normalize=True)


# --------------------------------------------------------------------------------------------------
# chunked kernels and bfloat16: GPU only


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("gate, normalize", [("key", True), ("scalar", True), (None, True), (None, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_linear_attention(mode, gate, normalize, dtype):
    linear_attention_fla, _ = fla_forms()
    xs, state = linear_inputs(gate, normalize, T=1000, B=2, H=4, K=128, V=64)
    cast = [t if t is None or i == 3 else t.to(dtype) for i, t in enumerate(xs)]
    y, s, g = with_grads(linear_attention_fla, cast, state, normalize, mode=mode)
    y0, s0, g0 = with_grads(
        linear_attention_naive, [None if t is None else t.float() for t in cast], state, normalize
    )
    tol = 2e-3 if dtype == torch.float32 else 5e-2  # fla computes fp32 products in TF32
    assert_close_all([y, s.S, s.z], [y0, s0.S, s0.z], atol=tol, rtol=tol)
    for a, b in zip(g, g0):
        assert (a.float() - b).abs().max() <= tol * (1 + b.abs().max())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated-delta"])
def test_gpu_delta_rule_chunked_bf16(gated):
    _, delta_rule_fla = fla_forms()
    xs, state = delta_inputs(gated, T=1000, B=2, H=4, K=128, V=128)
    cast = [t if t is None or i >= 3 else t.to(torch.bfloat16) for i, t in enumerate(xs)]
    y, s, g = with_grads(delta_rule_fla, cast, state, mode="chunk")
    y0, s0, g0 = with_grads(delta_rule_naive, [None if t is None else t.float() for t in cast], state)
    assert_close_all([y, s], [y0, s0], atol=5e-2, rtol=5e-2)
    for a, b in zip(g, g0):
        assert (a.float() - b).abs().max() <= 5e-2 * (1 + b.abs().max())
