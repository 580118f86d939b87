"""The C decoding step of the (gated) delta rule (csrc/delta_step.c) against the PyTorch step the dispatcher
runs without it: outputs and states with and without the gate, from a state and from none; the state
handed in left as it was; and where it steps aside."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.kernels import dispatch, native
from zoo.kernels.delta_step import delta_step_in_c

pytestmark = pytest.mark.skipif(native.find_compiler() is None, reason="no C compiler on this machine")


def inputs(gated, with_state, B=2, H=3, Dk=12, Dv=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, Dk, generator=g)
    k = F.normalize(torch.randn(B, H, 1, Dk, generator=g), dim=-1)
    v = torch.randn(B, H, 1, Dv, generator=g)
    beta = torch.rand(B, H, 1, generator=g)
    log_gate = -2 * torch.rand(B, H, 1, generator=g) if gated else None
    state = torch.randn(B, H, Dk, Dv, generator=g) if with_state else None
    return q, k, v, beta, log_gate, state


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_the_c_step_is_the_pytorch_step(gated, with_state):
    q, k, v, beta, log_gate, state = inputs(gated, with_state)
    kept = None if state is None else state.clone()
    with torch.no_grad():
        y, S = delta_step_in_c(q, k, v, beta, log_gate, state)
        with native.disabled():
            assert delta_step_in_c(q, k, v, beta, log_gate, state) is None
            y_ref, S_ref = dispatch.delta_rule(q, k, v, beta, log_gate, state)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(S, S_ref, rtol=1e-5, atol=1e-6)
    if kept is not None:
        assert torch.equal(kept, state)  # the state handed in stays as it was


def test_many_steps_follow_the_pytorch_steps():
    q, k, v, beta, log_gate, state = inputs(True, True, seed=1)
    S_c = S_ref = state
    with torch.no_grad():
        for step in range(20):
            q, k, v, beta, log_gate, _ = inputs(True, False, seed=10 + step)
            y, S_c = dispatch.delta_rule(q, k, v, beta, log_gate, S_c)
            with native.disabled():
                y_ref, S_ref = dispatch.delta_rule(q, k, v, beta, log_gate, S_ref)
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S_c, S_ref, rtol=1e-5, atol=1e-5)


def test_the_dispatcher_takes_it_for_one_token(monkeypatch):
    q, k, v, beta, log_gate, state = inputs(True, True)
    asked = []
    real = native.function
    monkeypatch.setattr(native, "function", lambda name, *a, **kw: asked.append(name) or real(name, *a, **kw))
    with torch.no_grad():
        dispatch.delta_rule(q, k, v, beta, log_gate, state)
    assert asked == ["delta_step"]


def test_it_steps_aside_where_it_does_not_apply():
    q, k, v, beta, log_gate, state = inputs(True, True)
    two = [torch.cat([t, t], 2) for t in (q, k, v, beta, log_gate)]
    assert delta_step_in_c(*two, state) is None  # two tokens
    assert delta_step_in_c(*(t.double() for t in (q, k, v, beta, log_gate, state))) is None
    leaf = state.clone().requires_grad_()
    assert delta_step_in_c(q, k, v, beta, log_gate, leaf) is None  # a gradient to take
    with torch.no_grad():
        assert delta_step_in_c(q, k, v, beta, log_gate, leaf) is not None
        assert delta_step_in_c(q, k, v, beta, log_gate, state[:, :1]) is None  # a state of other heads
