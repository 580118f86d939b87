"""The C forms of the long passes over memory against their PyTorch forms (zoo.kernels.native off):
Hedgehog's features of many rows (csrc/hedgehog_rows.c), `gla`'s low-rank log gate and its backward
(csrc/low_rank_gate.c), the chunked linear attention's per-key gate fold (csrc/gate_fold.c) and the
per-key gate gradient (csrc/gate_grad.c): values, gradients, the edges of their exp and log sigmoid, and
the conditions under which the PyTorch form runs instead."""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo.kernels import native
from zoo.kernels.linear_attention import linear_attention_chunked, linear_attention_naive
from zoo.mixers.features import hedgehog_features

pytestmark = pytest.mark.skipif(native.find_compiler() is None, reason="no C compiler on this machine")


@pytest.fixture
def calls(monkeypatch):
    """The C entries asked for during the test, by library name."""
    asked = []
    real = native.function

    def spy(name, *args, **kwargs):
        fn = real(name, *args, **kwargs)
        if fn is not None:
            asked.append(name)
        return fn

    monkeypatch.setattr(native, "function", spy)
    return asked


def close(actual, expected, tol=2e-6):
    """max |actual - expected| <= tol * max |expected| (sums of many terms round differently)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.isfinite(actual).all()
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol} * {scale:.3g}"


@pytest.mark.parametrize("shape", [(1, 3, 17, 5), (2, 4, 33, 64), (7, 128)])
@pytest.mark.parametrize("spread", [0.1, 3.0, 60.0])
def test_hedgehog_rows_match_the_softmaxes(calls, shape, spread):
    h = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * spread
    with torch.no_grad():
        fused = hedgehog_features(h)
        with native.disabled():
            plain = hedgehog_features(h)
    assert set(calls) == {"hedgehog_rows"}
    close(fused, plain)
    assert fused.shape == (*shape[:-1], 2 * shape[-1])


@pytest.mark.parametrize("spread", [0.5, 30.0])
def test_hedgehog_rows_backward_matches_the_softmaxes(calls, spread):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 3, 9, 16, generator=g) * spread
    dout = torch.randn(2, 3, 9, 32, generator=g)
    grads = []
    for off in (False, True):
        leaf = h.clone().requires_grad_(True)
        with native.disabled() if off else torch.enable_grad():
            (hedgehog_features(leaf) * dout).sum().backward()
        grads.append(leaf.grad)
    assert "hedgehog_rows" in calls
    close(grads[0], grads[1], 1e-5)
    hd = h.double().requires_grad_(True)
    ((torch.cat([torch.softmax(hd, -1), torch.softmax(-hd, -1)], -1) * dout.double()).sum()).backward()
    close(grads[0].double(), hd.grad, 1e-5)


def test_hedgehog_rows_take_any_strides_and_leave_other_dtypes_to_pytorch(calls):
    h = torch.randn(2, 3, 9, 4)
    with torch.no_grad():
        strided = hedgehog_features(h.transpose(-1, -2))
        with native.disabled():
            plain = hedgehog_features(h.transpose(-1, -2))
        close(strided, plain)
        assert "hedgehog_rows" in calls
        calls.clear()
        hedgehog_features(h.double())
        hedgehog_features(h.bfloat16())
    assert calls == []


def test_hedgehog_rows_use_the_threads_torch_has(calls):
    h = torch.randn(3, 5, 40, 16)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                results.append(hedgehog_features(h))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])


def gla(seed=0, gate_std=20.0, **options):
    """A small `gla` with random maps and gates; gate_std 20 puts logits past +-60, both tails of the log
    sigmoid (where a one-ulp difference in a logit of 35 moves the decay over a chunk by 1e-5: the forward
    comparison takes milder gates)."""
    torch.manual_seed(seed)
    m = zoo.get_mixer("gla")(4, 2, 8, 24, 0, feature_dim=6, rank=3, **options)
    with torch.no_grad():
        m.gate_up.weight.normal_(std=gate_std)
        m.gate_up.bias.normal_(std=3.0)
        for linear in (m.feature_map_q, m.feature_map_k):
            linear.weight.normal_()
    return m


def gla_inputs(T=45, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, T, 8, generator=g),
        torch.randn(2, 2, T, 8, generator=g),
        torch.randn(2, 2, T, 8, generator=g),
        torch.randn(2, T, 24, generator=g),
    )


def test_gla_gate_in_c_matches_the_log_sigmoid(calls):
    m = gla()
    q, k, v, x = gla_inputs()
    with torch.no_grad():
        tokens, _ = m.tokens_and_state(q, x, None, None)
        fused = m.log_gate(q, k, tokens)
        with native.disabled():
            plain = m.log_gate(q, k, tokens)
    assert "low_rank_gate" in calls
    assert fused.is_contiguous() and fused.shape == (2, 4, 45, 12)
    logits = torch.nn.functional.linear(
        torch.nn.functional.linear(x, m.gate_down.weight), m.gate_up.weight, m.gate_up.bias
    )
    assert logits.min() < -60 and logits.max() > 60
    close(fused, plain)


def test_gla_forward_with_and_without_c_kernels_agree(calls):
    m = gla(gate_std=1.0, tau=2.0)
    q, k, v, x = gla_inputs(T=130)
    with torch.no_grad():
        y, state = m(q, k, v, x)
        with native.disabled():
            y0, state0 = m(q, k, v, x)
    assert {"low_rank_gate", "hedgehog_rows", "gate_fold"} <= set(calls)
    close(y, y0, 1e-5)
    close(state.S, state0.S, 1e-5)


def test_gla_gate_gradients_in_c_match_pytorch(calls):
    m = gla(gate_std=2.0)
    q, k, v, x = gla_inputs()
    x.requires_grad_(True)
    dout = torch.randn(2, 4, 45, 12, generator=torch.Generator().manual_seed(5))
    grads = []
    for off in (False, True):
        m.zero_grad()
        x.grad = None
        with native.disabled() if off else torch.enable_grad():
            tokens, _ = m.tokens_and_state(q, x, None, None)
            g = m.log_gate(q, k, tokens)
            assert g.shape == (2, 4, 45, 12) and g.grad_fn is not None
            (g * dout).sum().backward()
        grads.append((x.grad.clone(), m.gate_up.weight.grad.clone(), m.gate_up.bias.grad.clone()))
    assert calls.count("low_rank_gate") >= 2  # the forward and the backward entries
    for fused, plain in zip(*grads):
        close(fused, plain, 1e-5)


def test_gla_gate_in_c_passes_gradcheck():
    from zoo.kernels.low_rank_gate import low_rank_log_gate

    g = torch.Generator().manual_seed(2)
    h, w, b = torch.randn(1, 5, 3, generator=g), torch.randn(8, 3, generator=g), torch.randn(8, generator=g)
    h, w, b = (t.requires_grad_(True) for t in (h, w, b))
    out = low_rank_log_gate(h, w, b, 0.5, 2)
    dout = torch.randn_like(out)
    fused = torch.autograd.grad(out, (h, w, b), dout)
    hd, wd, bd = (t.detach().double().requires_grad_(True) for t in (h, w, b))
    ref = torch.nn.functional.logsigmoid(hd @ wd.t() + bd).view(1, 5, 2, 4).transpose(1, 2) * 0.5
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    expected = torch.autograd.grad(ref, (hd, wd, bd), dout.double())
    for a, e in zip(fused, expected):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("T", [1, 63, 200])
def test_gate_fold_in_c_matches_the_pytorch_fold_and_the_naive_form(calls, normalize, T):
    g = torch.Generator().manual_seed(T)
    q, k = (torch.rand(2, 3, T, 16, generator=g) for _ in range(2))
    v = torch.randn(2, 3, T, 8, generator=g)
    log_gate = -0.3 * torch.rand(2, 3, T, 16, generator=g)
    if T > 100:
        log_gate[:, :, 70] = -80.0  # one chunk takes the strong-decay path; the others the C fold
    with torch.no_grad():
        y, s = linear_attention_chunked(q, k, v, log_gate, normalize=normalize)
        with native.disabled():
            y0, s0 = linear_attention_chunked(q, k, v, log_gate, normalize=normalize)
        y1, s1 = linear_attention_naive(q, k, v, log_gate, normalize=normalize)
    assert "gate_fold" in calls
    close(y, y0, 1e-5)
    close(s.S, s0.S, 1e-5)
    close(y, y1, 1e-5)


def test_gate_fold_and_gate_grad_in_c_give_the_pytorch_gradients(calls):
    g = torch.Generator().manual_seed(3)
    inputs = [torch.rand(1, 2, 150, 8, generator=g) for _ in range(2)]
    inputs += [torch.randn(1, 2, 150, 8, generator=g), -0.2 * torch.rand(1, 2, 150, 8, generator=g)]
    inputs[3][:, :, 90] = -70.0  # one strong chunk among mild ones
    dy = torch.randn(1, 2, 150, 8, generator=g)
    grads = []
    for off in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        with native.disabled() if off else torch.enable_grad():
            y, state = linear_attention_chunked(*leaves, normalize=True)
            ((y * dy).sum() + state.S.sum()).backward()
        grads.append([t.grad for t in leaves])
    assert {"gate_fold", "gate_grad"} <= set(calls)
    for fused, plain in zip(*grads):
        close(fused, plain, 1e-5)


def test_scalar_gates_take_no_per_key_kernel(calls):
    g = torch.Generator().manual_seed(3)
    q, k = (torch.rand(1, 2, 70, 8, generator=g).requires_grad_(True) for _ in range(2))
    v = torch.randn(1, 2, 70, 8, generator=g)
    y, _ = linear_attention_chunked(q, k, v, -0.1 * torch.rand(1, 2, 70, generator=g), normalize=True)
    y.sum().backward()
    assert calls == [] and q.grad is not None
