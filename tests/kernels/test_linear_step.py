"""The C decoding step of gated linear attention (csrc/linear_step.c) against the PyTorch step the dispatcher
runs without it: outputs and states for every gate kind, with and without the normalizer, grouped key/value
heads, from a state and from none; the state handed in left as it was; and where it steps aside."""

from __future__ import annotations

import pytest
import torch

from zoo.kernels import dispatch, native
from zoo.kernels.linear_attention import LinearAttentionState
from zoo.kernels.linear_step import linear_step_in_c

pytestmark = pytest.mark.skipif(native.find_compiler() is None, reason="no C compiler on this machine")


def inputs(kind, groups, normalize, with_state, B=2, Hkv=2, Dk=12, Dv=7, seed=0):
    """One token of q [B, H, 1, Dk] and keys, values, gates repeated over runs of `groups` heads, as the
    mixers hand them; the state once per key/value head."""
    g = torch.Generator().manual_seed(seed)
    H = Hkv * groups

    def per_kv(*shape):
        return torch.rand(B, Hkv, *shape, generator=g).repeat_interleave(groups, 1)

    q, k, v = torch.rand(B, H, 1, Dk, generator=g), per_kv(1, Dk), per_kv(1, Dv) - 0.5
    log_gate = None if kind is None else -3 * (per_kv(1) if kind == "scalar" else per_kv(1, Dk))
    state = None
    if with_state:
        z = torch.rand(B, Hkv, Dk, generator=g) * 5 if normalize else None
        state = LinearAttentionState(torch.randn(B, Hkv, Dk, Dv, generator=g), z)
    return q, k, v, log_gate, state


@pytest.mark.parametrize("kind", [None, "scalar", "key"])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
def test_the_c_step_is_the_pytorch_step(kind, groups, normalize, with_state):
    q, k, v, log_gate, state = inputs(kind, groups, normalize, with_state)
    kept = None if state is None else [t.clone() for t in state if t is not None]
    with torch.no_grad():
        y, new = linear_step_in_c(q, k, v, log_gate, state, normalize, 0.3, groups)
        with native.disabled():
            assert linear_step_in_c(q, k, v, log_gate, state, normalize, 0.3, groups) is None
            y_ref, ref = dispatch.linear_attention(q, k, v, log_gate, state, normalize, 0.3, kv_groups=groups)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new.S, ref.S, rtol=1e-5, atol=1e-6)
    assert (new.z is None) == (ref.z is None) == (not normalize)
    if normalize:
        torch.testing.assert_close(new.z, ref.z, rtol=1e-5, atol=1e-6)
    if kept is not None:  # the state handed in stays as it was
        for before, after in zip(kept, [t for t in state if t is not None]):
            assert torch.equal(before, after)


def test_the_dispatcher_takes_it_for_one_token(monkeypatch):
    q, k, v, log_gate, state = inputs("key", 3, True, True)
    asked = []
    real = native.function
    monkeypatch.setattr(native, "function", lambda name, *a, **kw: asked.append(name) or real(name, *a, **kw))
    with torch.no_grad():
        dispatch.linear_attention(q, k, v, log_gate, state, True, kv_groups=3)
    assert asked == ["linear_step"]


def test_it_steps_aside_where_it_does_not_apply():
    q, k, v, log_gate, state = inputs("scalar", 1, True, True)
    two = [torch.cat([t, t], 2) for t in (q, k, v, log_gate)]
    assert linear_step_in_c(*two, state, True, 1e-6) is None  # two tokens
    assert linear_step_in_c(q.double(), k.double(), v.double(), log_gate.double(), state, True, 1e-6) is None
    leaf = q.clone().requires_grad_()
    assert linear_step_in_c(leaf, k, v, log_gate, state, True, 1e-6) is None  # a gradient to take
    with torch.no_grad():
        assert linear_step_in_c(leaf, k, v, log_gate, state, True, 1e-6) is not None
        no_z = LinearAttentionState(state.S, None)
        assert linear_step_in_c(q, k, v, log_gate, no_z, True, 1e-6) is None  # the normalizer missing
        wrong = LinearAttentionState(state.S[:, :1], state.z[:, :1])
        assert linear_step_in_c(q, k, v, log_gate, wrong, True, 1e-6) is None  # a state of other heads
