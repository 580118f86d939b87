"""zoo.kernels.dispatch: backend names, the environment override, availability per device, the choice
per operation and input, and that on the CPU every operation gives exactly the PyTorch form's result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.kernels import delta_rule as torch_delta
from zoo.kernels import dispatch
from zoo.kernels import linear_attention as torch_linear
from zoo.kernels import window_hybrid as torch_hybrid
from zoo.kernels.dispatch import ENV_VAR, available_backends, backend_for, requested_backend

CUDA = torch.device("cuda")  # a device object only: nothing here runs on it


@pytest.fixture
def no_override(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def everything_usable(monkeypatch, no_override):
    """Pretend triton and fla are installed and usable on CUDA (and only there)."""
    monkeypatch.setattr(dispatch, "_usable", lambda name, device: name == "torch" or device.type == "cuda")


def test_requested_backend(monkeypatch, no_override):
    assert requested_backend() is None
    for value in ("", "auto", " AUTO "):
        monkeypatch.setenv(ENV_VAR, value)
        assert requested_backend() is None
    monkeypatch.setenv(ENV_VAR, "Triton")
    assert requested_backend() == "triton"
    assert requested_backend("fla") == "fla"  # the argument wins over the environment
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=r"ZOO_KERNEL_BACKEND='cuda'.*torch, triton, fla, flex or auto"):
        requested_backend()
    with pytest.raises(ValueError, match=r"backend='flash'"):
        requested_backend("flash")


def test_available_backends(monkeypatch, no_override):
    monkeypatch.setattr(dispatch, "flex_available", lambda: False)
    monkeypatch.setattr(dispatch, "triton_installed", lambda: True)
    assert available_backends("cpu") == available_backends("cpu", include_emulated=True) == ["torch"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter makes Triton usable on the CPU, fla never
    assert available_backends("cpu", include_emulated=True) == ["torch", "triton"]
    monkeypatch.setattr(dispatch, "flex_available", lambda: True)  # FlexAttention runs eagerly on the CPU
    assert available_backends("cpu", include_emulated=True) == ["torch", "triton", "flex"]
    assert available_backends("cpu") == ["torch"]  # natively: nothing but the PyTorch forms
    monkeypatch.setattr(dispatch, "fla_installed", lambda: True)
    assert available_backends("cuda") == ["torch", "triton", "fla", "flex"]


def test_automatic_choice(everything_usable):
    for op in dispatch.FAST_BACKENDS:
        assert backend_for(op, "cpu") == "torch"  # the CPU always takes the PyTorch forms
    assert backend_for("window_hybrid", CUDA) == "triton"
    assert backend_for("linear_attention", CUDA) == "fla"
    assert backend_for("delta_rule", CUDA) == "fla"
    assert backend_for("window_hybrid", CUDA, fits=lambda name: False) == "torch"
    assert backend_for("window_hybrid", CUDA, fits=lambda name: name == "flex") == "flex"  # the next in line
    with pytest.raises(ValueError, match="unknown operation"):
        backend_for("flow_attention", CUDA)


def test_forced_backend(monkeypatch, everything_usable):
    monkeypatch.setenv(ENV_VAR, "torch")
    assert backend_for("window_hybrid", CUDA) == "torch"
    monkeypatch.setenv(ENV_VAR, "fla")
    assert backend_for("linear_attention", CUDA) == "fla"
    assert backend_for("window_hybrid", CUDA) == "torch"  # fla has no window hybrid
    assert backend_for("linear_attention", CUDA, fits=lambda name: False) == "torch"
    with pytest.raises(RuntimeError, match="'fla' was asked for .* not available on cpu"):
        backend_for("linear_attention", "cpu")


def test_forcing_triton_on_the_cpu_needs_the_interpreter(monkeypatch, no_override):
    monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend_for("window_hybrid", "cpu")
    assert backend_for("linear_attention", "cpu") == "torch"  # not a Triton operation here: unaffected


def test_delta_rule_limits_of_fla():
    q = torch.randn(1, 2, 20, 8)
    beta = torch.rand(1, 2, 20)
    gate = torch.zeros(1, 2, 20)
    mode, why = dispatch._delta_mode(q, q, q, beta, None, None)
    assert mode == "chunk" and "float32" in why  # fla's chunked delta rule takes half precision only
    h = q.bfloat16()
    assert dispatch._delta_mode(h, h, h, beta, None, None) == ("chunk", None)
    short = q[:, :, :3]  # decoding
    assert dispatch._delta_mode(short, short, short, beta[..., :3], gate[..., :3], None) == (
        "recurrent",
        None,
    )
    with torch.enable_grad():  # fla's fused recurrent gated delta rule has no backward: chunked instead
        leaf = short.clone().requires_grad_()
        assert dispatch._delta_mode(leaf, short, short, beta[..., :3], gate[..., :3], None) == ("chunk", None)


@pytest.mark.parametrize("forced", [None, "torch", "fla"])
def test_cpu_results_are_the_pytorch_forms(monkeypatch, no_override, forced):
    """On the CPU the dispatching functions are the PyTorch forms, bit for bit (fla, forced, is not
    available on the CPU for the fla operations, and does not implement the window hybrid)."""
    if forced:
        monkeypatch.setenv(ENV_VAR, forced)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 40, 8, generator=g).softmax(-1) for _ in range(2))
    v = torch.randn(2, 3, 40, 5, generator=g)
    a = torch.rand(3, generator=g)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :5] = False
    y, st = dispatch.window_hybrid(q, k, v, q, k, a, 1 - a, window=16, key_mask=mask)
    y0, st0 = torch_hybrid.window_hybrid(q, k, v, q, k, a, 1 - a, window=16, key_mask=mask)
    assert torch.equal(y, y0) and torch.equal(st.S, st0.S)
    if forced == "fla":
        with pytest.raises(RuntimeError, match="not available on cpu"):
            dispatch.linear_attention(q, k, v)
        return
    log_gate = F.logsigmoid(torch.randn(2, 3, 40, 8, generator=g) + 2)
    y, st = dispatch.linear_attention(q, k, v, log_gate, normalize=True)
    y0, st0 = torch_linear.linear_attention(q, k, v, log_gate, normalize=True)
    assert torch.equal(y, y0) and torch.equal(st.S, st0.S) and torch.equal(st.z, st0.z)
    beta = torch.rand(2, 3, 40, generator=g)
    kn = F.normalize(k, dim=-1)
    y, S = dispatch.delta_rule(q, kn, v, beta, log_gate[..., 0])
    y0, S0 = torch_delta.delta_rule(q, kn, v, beta, log_gate[..., 0])
    assert torch.equal(y, y0) and torch.equal(S, S0)


def test_padded_prefill_takes_the_pytorch_form_even_when_triton_is_forced(monkeypatch, no_override):
    """The fused prefill kernel takes no padding: such calls run on torch (bit for bit its result)."""
    monkeypatch.setattr(dispatch, "_usable", lambda name, device: True)
    monkeypatch.setenv(ENV_VAR, "triton")
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 2, 30, 8, generator=g) for _ in range(2))
    v = torch.randn(2, 2, 30, 4, generator=g)
    fk = torch.rand(2, 2, 30, 3, generator=g)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, :4] = False
    y, st = dispatch.window_hybrid(q, k, v, fk, fk, 0.5, 0.5, window=8, key_mask=mask)
    y0, st0 = torch_hybrid.window_hybrid(q, k, v, fk, fk, 0.5, 0.5, window=8, key_mask=mask)
    assert torch.equal(y, y0) and torch.equal(st.S, st0.S)
    y, _ = dispatch.window_hybrid(*(x.double() for x in (q, k, v, fk, fk)), 0.5, 0.5, window=8)  # nor float64
    assert torch.equal(
        y, torch_hybrid.window_hybrid(*(x.double() for x in (q, k, v, fk, fk)), 0.5, 0.5, window=8)[0]
    )
    # no window (softmax over the sinks alone) has the PyTorch forms only: prefill and decoding steps alike
    y, st = dispatch.window_hybrid(q, k, v, fk, fk, 0.5, 0.5, window=0, sinks=2)
    y0, st0 = torch_hybrid.window_hybrid(q, k, v, fk, fk, 0.5, 0.5, window=0, sinks=2)
    assert torch.equal(y, y0) and torch.equal(st.sink_k, st0.sink_k)
    step = [x[:, :, :1] for x in (q, k, v, fk, fk)]
    y, _ = dispatch.window_hybrid(*step, 0.5, 0.5, window=0, sinks=2, state=st)
    assert torch.equal(y, torch_hybrid.window_hybrid_step(*step, 0.5, 0.5, window=0, sinks=2, state=st0)[0])


def test_sinks_skip_flex_but_not_triton(monkeypatch, no_override):
    """FlexAttention has no sinks (such calls run on torch); the Triton kernels take them."""
    monkeypatch.setattr(dispatch, "_usable", lambda name, device: True)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 20, 8, generator=g) for _ in range(3))
    fits = {}

    def spy(op, device, backend=None, fits_fn=None):
        fits.update({name: fits_fn(name) for name in ("triton", "flex")})
        return "torch"

    monkeypatch.setattr(dispatch, "backend_for", spy)
    y, _ = dispatch.window_hybrid(q, k, v, q, k, 1.0, 0.0, window=8, sinks=2)
    assert fits == {"triton": True, "flex": False}
    assert torch.equal(y, torch_hybrid.window_hybrid(q, k, v, q, k, 1.0, 0.0, window=8, sinks=2)[0])


@pytest.mark.parametrize(
    "capability, triton, tilelang, refused",
    [
        ((9, 0), "3.6.0", False, True),  # an H100 with the Triton CUDA torch 2.11 pins: seen refused
        ((9, 0), "3.4.0", False, True),
        ((9, 0), "3.7.1", False, False),  # fixed there
        ((9, 0), "3.3.1", False, False),  # before the regression
        ((9, 0), "3.6.0", True, False),  # fla takes tilelang's kernel instead
        ((8, 0), "3.6.0", False, False),  # an A100: not affected
    ],
)
def test_fla_gated_chunk_backward_refused(capability, triton, tilelang, refused):
    from zoo.kernels.fla_backend import gated_chunk_backward_refused

    assert gated_chunk_backward_refused(capability, triton, tilelang) is refused


def test_gated_training_avoids_fla_where_fla_refuses_its_backward(monkeypatch, no_override):
    monkeypatch.setattr(dispatch, "gated_chunk_backward_works", lambda device: False)
    q = torch.randn(1, 2, 80, 8)  # long enough for the chunked form
    gate = -torch.rand(1, 2, 80)
    leaf = q.clone().requires_grad_()
    refused = dispatch._gated_chunk_backward_refused
    with torch.enable_grad():
        assert refused("chunk", gate, leaf, q, q, gate)
        assert not refused("chunk", None, leaf, q, q)  # ungated: fla's backward is fine
        assert not refused("recurrent", gate, leaf, q, q, gate)  # not the chunked kernels
        h = leaf.bfloat16()
        beta = torch.rand(1, 2, 80)
        mode, why = dispatch._delta_mode(h, h, h, beta, gate, None)
        assert mode == "chunk" and "#640" in why  # so the gated delta rule trains on the PyTorch form
    assert not refused("chunk", gate, q, q, q, gate)  # inference: no backward, fla serves
    # forced to fla and usable, a gated training call the backward of which fla refuses runs on torch
    monkeypatch.setattr(dispatch, "_usable", lambda name, device: True)
    monkeypatch.setenv(ENV_VAR, "fla")
    k, v = torch.randn(1, 2, 80, 8).sigmoid(), torch.randn(1, 2, 80, 4)
    with torch.enable_grad():
        y, _ = dispatch.linear_attention(leaf.sigmoid(), k, v, gate)
    ref, _ = torch_linear.linear_attention(q.sigmoid(), k, v, gate)
    torch.testing.assert_close(y, ref)


def test_fla_gated_backward_is_never_refused_off_cuda():
    from zoo.kernels.fla_backend import gated_chunk_backward_works

    assert gated_chunk_backward_works(torch.device("cpu"))


@pytest.mark.parametrize("sinks", [0, 3])
def test_window_hybrid_keeps_a_grouped_state_once_per_key_value_head(sinks):
    """kv_groups: inputs repeated for grouped-query attention give the results of the ungrouped call,
    with the state stored at [B, Hkv, ...] and repeated for the kernels."""
    torch.manual_seed(0)
    B, Hkv, groups, T, D, F_ = 2, 2, 3, 37, 8, 6
    q, fq = torch.randn(B, Hkv * groups, T + 1, D), torch.rand(B, Hkv * groups, T + 1, F_)
    k, v, fk = (torch.randn(B, Hkv, T + 1, n).repeat_interleave(groups, 1) for n in (D, D, F_))
    fk = fk.abs()
    a = torch.rand(Hkv * groups)
    first, last = slice(0, T), slice(T, T + 1)
    y, st = dispatch.window_hybrid(
        q[:, :, first],
        k[:, :, first],
        v[:, :, first],
        fq[:, :, first],
        fk[:, :, first],
        a,
        1 - a,
        window=8,
        kv_groups=groups,
        sinks=sinks,
    )
    y_ref, st_ref = dispatch.window_hybrid(
        q[:, :, first],
        k[:, :, first],
        v[:, :, first],
        fq[:, :, first],
        fk[:, :, first],
        a,
        1 - a,
        window=8,
        sinks=sinks,
    )
    torch.testing.assert_close(y, y_ref)
    assert (
        st.k.shape == (B, Hkv, 8, D) and st.S.shape == (B, Hkv, F_, D) and st_ref.k.shape[1] == Hkv * groups
    )
    assert st.sinks == sinks and (not sinks or st.sink_k.shape == (B, Hkv, sinks, D))
    for name in ("k", "v", "fk", "S", "z") + (("sink_k", "sink_v") if sinks else ()):
        torch.testing.assert_close(getattr(st.repeat_heads(groups), name), getattr(st_ref, name))
        assert getattr(st, name).is_contiguous()
    # one decoding step from each state: the same output, the grouped state still per KV head
    y1, st1 = dispatch.window_hybrid(
        q[:, :, last],
        k[:, :, last],
        v[:, :, last],
        fq[:, :, last],
        fk[:, :, last],
        a,
        1 - a,
        window=8,
        state=st,
        kv_groups=groups,
        sinks=sinks,
    )
    y1_ref, _ = dispatch.window_hybrid(
        q[:, :, last],
        k[:, :, last],
        v[:, :, last],
        fq[:, :, last],
        fk[:, :, last],
        a,
        1 - a,
        window=8,
        state=st_ref,
        sinks=sinks,
    )
    torch.testing.assert_close(y1, y1_ref)
    assert st1.k.shape[1] == Hkv and int(st1.n[0]) == T + 1
    with pytest.raises(ValueError, match="does not split into groups of 4"):
        st_ref.group_heads(4)


@pytest.mark.parametrize("gate", [None, "scalar", "key"])
def test_linear_attention_keeps_a_grouped_state_once_per_key_value_head(gate):
    torch.manual_seed(1)
    B, Hkv, groups, T, D = 2, 2, 3, 29, 8

    def shared(*shape):  # one tensor per key/value head, repeated for its query group
        return torch.randn(B, Hkv, *shape).repeat_interleave(groups, 1)

    q = torch.randn(B, Hkv * groups, T, D).abs()
    k, v = shared(T, D).abs(), shared(T, D)
    g = (
        None
        if gate is None
        else -torch.rand(*((B, Hkv, T) if gate == "scalar" else (B, Hkv, T, D))).repeat_interleave(groups, 1)
    )
    state, state_ref, ys, ys_ref = None, None, [], []
    for piece in (slice(0, 20), slice(20, 21), slice(21, T)):  # a prefill, a decoding step, the rest
        gp = None if g is None else g[:, :, piece]
        y, state = dispatch.linear_attention(
            q[:, :, piece], k[:, :, piece], v[:, :, piece], gp, state, normalize=True, kv_groups=groups
        )
        y_ref, state_ref = dispatch.linear_attention(
            q[:, :, piece], k[:, :, piece], v[:, :, piece], gp, state_ref, normalize=True
        )
        ys.append(y)
        ys_ref.append(y_ref)
        assert state.S.shape == (B, Hkv, D, D) and state.z.shape == (B, Hkv, D) and state.S.is_contiguous()
    torch.testing.assert_close(torch.cat(ys, 2), torch.cat(ys_ref, 2))
    torch.testing.assert_close(state.repeat_heads(groups).S, state_ref.S)
    torch.testing.assert_close(state.repeat_heads(groups).z, state_ref.z)
    with pytest.raises(ValueError, match="does not split into groups of 4"):
        state_ref.group_heads(4)
