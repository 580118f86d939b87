"""Window softmax through FlexAttention (zoo.kernels.flex_window) against the loop reference with the
linear branch off (a = 1, b = 0): outputs, gradients, the next state, continuing a padded state; and
the dispatcher's routing to it. Runs eagerly on the CPU (compiled on CUDA)."""

from __future__ import annotations

import pytest
import torch

from zoo.kernels import dispatch
from zoo.kernels.flex_window import MIN_COMPILED_HEAD_DIM, flex_available, flex_fits, is_window_only
from zoo.kernels.window_hybrid import window_hybrid_chunked, window_hybrid_naive

pytestmark = pytest.mark.skipif(not flex_available(), reason="needs torch.nn.attention.flex_attention")
B, H, D = 2, 2, 16  # 16: the smallest head dim compiled FlexAttention takes (CUDA)


def inputs(T, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    fk = torch.randn(B, H, T, 3, generator=g).softmax(-1)
    return q, k, v, fk


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
    ),
]


@pytest.mark.filterwarnings("ignore::UserWarning")  # flex_attention warns that it runs unfused (eager)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("terraced", [False, True], ids=["plain", "terraced"])
def test_window_softmax_matches_reference(terraced, device):
    """Fresh and continuing a padded state; gradients on CUDA only (FlexAttention has no CPU backward)."""
    from zoo.kernels.flex_window import window_softmax_flex

    W, T0, T1 = 8, 21, 30
    q, k, v, fk = (t.to(device) for t in inputs(T0 + T1, seed=int(terraced)))
    grad = device == "cuda"
    mask = torch.ones(B, T0, dtype=torch.bool, device=device)
    mask[1, :5] = False  # rows that have seen different numbers of tokens
    _, state = window_hybrid_chunked(
        q[:, :, :T0],
        k[:, :, :T0],
        v[:, :, :T0],
        fk[:, :, :T0],
        fk[:, :, :T0],
        1.0,
        0.0,
        window=W,
        terraced=terraced,
        key_mask=mask,
    )
    for st in (None, state):
        leaves = [t[:, :, T0:].clone().requires_grad_(grad) for t in (q, k, v)]
        y, new = window_softmax_flex(*leaves, fk[:, :, T0:], window=W, terraced=terraced, state=st)
        ref = [t[:, :, T0:].clone().requires_grad_(grad) for t in (q, k, v)]
        y0, new0 = window_hybrid_naive(
            *ref, fk[:, :, T0:], fk[:, :, T0:], 1.0, 0.0, window=W, terraced=terraced, state=st
        )
        torch.testing.assert_close(y, y0, atol=1e-5, rtol=1e-5)
        if grad:
            y.square().sum().backward()
            y0.square().sum().backward()
            for a, b in zip(leaves, ref):
                torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)
        assert torch.equal(new.n, new0.n)
        for name in ("k", "v", "fk", "S", "z"):
            torch.testing.assert_close(getattr(new, name), getattr(new0, name), atol=1e-5, rtol=1e-5)


def test_only_window_softmax_goes_to_flex(monkeypatch):
    assert is_window_only(1.0, 0.0, None) and is_window_only(torch.ones(2), 0, None)
    assert not is_window_only(1.0, 0.5, None) and not is_window_only(1.0, 0.0, torch.ones(2))
    assert not is_window_only(1.0, torch.zeros(2), None)  # a tensor b may be trained: no shortcut
    monkeypatch.setenv(dispatch.ENV_VAR, "flex")
    q, k, v, fk = inputs(12, seed=3)
    calls = []
    monkeypatch.setattr(
        "zoo.kernels.flex_window.window_softmax_flex", lambda *a, **kw: calls.append(1) or "flex"
    )
    assert dispatch.window_hybrid(q, k, v, fk, fk, 1.0, 0.0, window=4) == "flex"
    y, _ = dispatch.window_hybrid(q, k, v, fk, fk, 0.5, 0.5, window=4)  # a linear branch: the PyTorch form
    torch.testing.assert_close(y, window_hybrid_chunked(q, k, v, fk, fk, 0.5, 0.5, window=4)[0])
    q.requires_grad_()  # FlexAttention has no backward on the CPU: the PyTorch form there
    y, _ = dispatch.window_hybrid(q, k, v, fk, fk, 1.0, 0.0, window=4)
    assert isinstance(y, torch.Tensor) and y.requires_grad
    assert calls == [1]


def test_compiled_flex_refuses_small_head_dims_before_running():
    """Compiled FlexAttention (CUDA) takes head dims >= 16; the dispatcher asks flex_fits first, and a
    direct call says what was wrong instead of an inductor lowering error."""
    from zoo.kernels.flex_window import window_softmax_flex

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert flex_fits(cpu, 8, 8) and flex_fits(cuda, 16, 64) and flex_fits(cuda, 128, 128)
    assert not flex_fits(cuda, 8, 64) and not flex_fits(cuda, 64, 8) and MIN_COMPILED_HEAD_DIM == 16
    q, k, v, fk = (torch.empty(1, 2, 4, n, device="meta") for n in (8, 8, 8, 3))
    with pytest.raises(ValueError, match="FlexAttention on meta needs head dims >= 16, got q/k 8 and v 8"):
        window_softmax_flex(q, k, v, fk, window=4)
