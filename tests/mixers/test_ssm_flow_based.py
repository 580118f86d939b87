"""The `mamba2`, `flow`, `based` and `based-window` mixers: carry, padding, GQA, gradients, and what is
particular to each (mamba2's teacher start and conv, Flow-Attention against a loop reference, the Taylor
map)."""

from __future__ import annotations

import math

import pytest
import torch
from mixer_testing import HIDDEN, HKV, D, H, inputs, part, run_pieces
from torch import nn

from zoo.cache import map_state
from zoo.kernels.flow_attention import flow_attention, flow_attention_naive
from zoo.kernels.linear_attention import linear_attention
from zoo.kernels.short_conv import causal_conv
from zoo.mixers import build_mixer, get_mixer, list_mixers, repeat_kv
from zoo.mixers.features import num_taylor_features, taylor_features

NAMES = ["mamba2", "flow", "based", "based-window"]
OPTIONS = {
    "mamba2": {"conv_size": 4, "dt_min": 1e-3, "dt_max": 1e-2},
    "flow": {"feature_dim": None, "eps": 1e-6},
    "based": {"feature_dim": 16},
    "based-window": {
        "window": 64,
        "feature_dim": 16,
        "window_factor": 0.99,
        "sinks": 0,
        "linear_mass_tokens": None,
        "linear_horizon": None,
    },
}
SMALL = {"based-window": {"window": 8, "feature_dim": 8}, "based": {"feature_dim": 8}}


def make_mixer(name, seed=0, num_kv_heads=HKV, perturb=0.3, **options):
    torch.manual_seed(seed)
    m = build_mixer(name, H, num_kv_heads, D, HIDDEN, 0, **{**SMALL.get(name, {}), **options})
    with torch.no_grad():  # move off the (deterministic) start so the tests see generic parameters
        for p in m.parameters():
            p.add_(perturb * torch.randn_like(p))
    return m


def tensors(state):
    out = []
    map_state(lambda t: out.append(t) or t, state)
    return out


def assert_states_close(a, b, atol=2e-5):
    ta, tb = tensors(a), tensors(b)
    assert len(ta) == len(tb)
    for i, (x, y) in enumerate(zip(ta, tb)):
        torch.testing.assert_close(
            x.double(), y.double(), atol=atol, rtol=1e-4, msg=lambda m, i=i: f"state[{i}]: {m}"
        )


def test_registered_with_attributes():
    assert set(NAMES) <= set(list_mixers())
    for name in NAMES:
        cls = get_mixer(name)
        assert cls.description and cls.source and cls.state_size not in ("", "?")
        assert cls.options == OPTIONS[name]
        with pytest.raises(ValueError, match="unknown option"):
            build_mixer(name, H, HKV, D, HIDDEN, 0, no_such_option=1)
    assert {n: get_mixer(n).family for n in NAMES} == {
        "mamba2": "ssm",
        "flow": "linear",
        "based": "linear",
        "based-window": "hybrid",
    }


@pytest.mark.parametrize("name", NAMES)
def test_split_and_carry(name):
    m = make_mixer(name)
    T = 150
    ts = inputs(T)
    with torch.no_grad():
        y, s = m(*ts)
        y2, s2 = run_pieces(m, ts, [0, 1, 70, 149, T])
    torch.testing.assert_close(y2, y, atol=2e-5, rtol=1e-4)
    assert_states_close(s2, s)


@pytest.mark.parametrize("name", NAMES)
def test_left_padding_adds_nothing(name):
    """Rows left-padded with garbage give the unpadded outputs on real tokens, the unpadded state, and
    the same continuation."""
    m = make_mixer(name)
    T, pads = 40, (0, 13)
    ts = inputs(T + max(pads), seed=2)
    more = inputs(5, seed=3)
    mask = torch.ones(2, T + max(pads), dtype=torch.long)
    for row, p in enumerate(pads):
        mask[row, : max(pads) - p] = 0  # row 0 has 13 pads, row 1 none
    with torch.no_grad():
        y_pad, s_pad = m(*ts, mask=mask)
        y_next, _ = m(*more, state=s_pad)
        for row in range(2):
            lo = int((mask[row] == 0).sum())
            one = [t[row : row + 1] for t in part(ts, lo, T + max(pads))]
            y1, s1 = m(*one, state=None)
            torch.testing.assert_close(y_pad[row : row + 1, :, lo:], y1, atol=2e-5, rtol=1e-4)
            assert_states_close(map_state(lambda t, r=row: t[r : r + 1], s_pad), s1)
            yn, _ = m(*[t[row : row + 1] for t in more], state=s1)
            torch.testing.assert_close(y_next[row : row + 1], yn, atol=2e-5, rtol=1e-4)
        assert torch.isfinite(y_pad).all()


@pytest.mark.parametrize("name", NAMES)
def test_gqa_shapes(name):
    m = make_mixer(name)
    ts = inputs(20)
    y, state = m(*ts)
    assert y.shape == (2, H, 20, D) and y.dtype == torch.float32 and torch.isfinite(y).all()
    F = {"mamba2": 2 * D, "flow": D, "based": num_taylor_features(8), "based-window": num_taylor_features(8)}[
        name
    ]
    # based and based-window keep their state once per key/value head (a query group shares its keys)
    heads = HKV if name in ("based", "based-window") else H
    assert state.S.shape == (2, heads, F, D) and state.S.dtype == torch.float32
    if name == "mamba2":
        assert state.conv.shape == (2, HKV, 3, D)
    # grouped-query attention equals multi-head attention with each key/value head repeated
    mha = make_mixer(name, num_kv_heads=H, perturb=0.0)
    gqa = make_mixer(name, perturb=0.0)
    q, k, v, x = ts
    torch.testing.assert_close(
        gqa(q, k, v, x)[0], mha(q, repeat_kv(k, H), repeat_kv(v, H), x)[0], atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_all_parameters(name):
    m = make_mixer(name, perturb=0.1)
    ts = inputs(80, seed=4)
    y, _ = m(*ts)
    (y * torch.randn_like(y)).sum().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


# --- mamba2 -------------------------------------------------------------------------------------------


def test_mamba2_starts_from_the_teachers_weights():
    """C, B, x start as the teacher's q, k, v themselves: the C/B maps start as the identity, the conv
    as the identity, every parameter is deterministic (any seed gives the same mixer), and the output
    is the SSD recurrence read directly on q, k, v."""
    torch.manual_seed(0)
    a = build_mixer("mamba2", H, HKV, D, HIDDEN, 0)
    torch.manual_seed(1)
    b = build_mixer("mamba2", H, HKV, D, HIDDEN, 0)
    shapes = {n: tuple(p.shape) for n, p in a.named_parameters()}
    assert shapes == {
        "dt_proj.weight": (H, HIDDEN),
        "dt_bias": (H,),
        "A_log": (H,),
        "D": (H,),
        "conv_delta": (HKV, D, 4),
        "c_map.weight": (H, D, D),
        "b_map.weight": (HKV, D, D),
    }
    for (n, p), (_, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, p2), f"{n} is random"
    assert not a.dt_proj.weight.any() and not a.D.any() and not a.conv_delta.any() and not a.A_log.any()
    assert torch.equal(a.c_map.weight, torch.eye(D).expand(H, D, D)) and torch.equal(
        a.b_map.weight, torch.eye(D).expand(HKV, D, D)
    )
    q, k, v, x = inputs(30, seed=5)
    xs, hist = causal_conv(v, a.conv_weight(), torch.zeros(2, HKV, 3, D))
    assert torch.equal(xs, v) and torch.equal(hist, v[:, :, -3:])  # identity: x = v
    dt = torch.logspace(-3, -2, H)
    torch.testing.assert_close(torch.nn.functional.softplus(a.dt_bias), dt)

    def phi(t):
        return torch.cat([t.softmax(-1), (-t).softmax(-1)], -1)

    gate = (-dt)[None, :, None].expand(2, H, 30)
    ref, _ = linear_attention(
        phi(q), phi(repeat_kv(k, H)) * dt[:, None, None], repeat_kv(v, H), log_gate=gate, normalize=True
    )
    with torch.no_grad():
        torch.testing.assert_close(a(q, k, v, x)[0], ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("split", [1, 2, 3])
def test_mamba2_carry_across_the_conv_boundary(split):
    m = make_mixer("mamba2")
    ts = inputs(12, seed=6)
    with torch.no_grad():
        y, s = m(*ts)
        y2, s2 = run_pieces(m, ts, [0, split, 12])
        y3, s3 = run_pieces(m, ts, list(range(13)))  # token by token
    for yy, ss in ((y2, s2), (y3, s3)):
        torch.testing.assert_close(yy, y, atol=2e-5, rtol=1e-4)
        assert_states_close(ss, s)


def test_causal_conv_skips_padding_anywhere():
    g = torch.Generator().manual_seed(7)
    w, x = torch.randn(HKV, D, 4, generator=g), torch.randn(1, HKV, 9, D, generator=g)
    hist = torch.randn(1, HKV, 3, D, generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 1, 1]])
    out, new = causal_conv(x, w, hist, mask)
    ref, ref_new = causal_conv(x[:, :, mask[0].bool()], w, hist)
    torch.testing.assert_close(out[:, :, mask[0].bool()], ref)
    torch.testing.assert_close(new, ref_new)
    assert not out[:, :, ~mask[0].bool()].any()


# --- flow ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True])
def test_flow_vectorized_equals_loop_reference(padded):
    m = make_mixer("flow")
    q, k, v, x = inputs(40, seed=8)
    mask = None
    if padded:
        mask = torch.ones(2, 40, dtype=torch.long)
        mask[0, :9] = 0
    with torch.no_grad():
        y, _ = m(q, k, v, x, mask=mask)
        fq, fk = m.features(q, k)
        ref = flow_attention_naive(fq, fk, repeat_kv(v, H), mask=mask)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)


def test_flow_is_stable_for_extreme_flows():
    """Near-zero features make the conserved outflows (the competition logits) huge; the log-space
    competition stays finite and still matches the reference (whose softmax is exact)."""
    g = torch.Generator().manual_seed(9)
    fq = torch.sigmoid(torch.randn(1, 2, 30, 8, generator=g) * 12)
    fk = torch.sigmoid(torch.randn(1, 2, 30, 8, generator=g) * 12)
    v = torch.randn(1, 2, 30, 4, generator=g)
    y, state = flow_attention(fq, fk, v)
    assert torch.isfinite(y).all() and all(torch.isfinite(t.float()).all() for t in state)
    ref = flow_attention_naive(fq, fk, v)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-3)
    y1, s1 = flow_attention(fq[:, :, :11], fk[:, :, :11], v[:, :, :11])
    y2, _ = flow_attention(fq[:, :, 11:], fk[:, :, 11:], v[:, :, 11:], state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 2), y, atol=1e-4, rtol=1e-3)


# --- based --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [4, 16])
def test_taylor_dot_product(d):
    g = torch.Generator().manual_seed(10)
    a, b = torch.randn(50, d, generator=g) * 2, torch.randn(50, d, generator=g) * 2
    fa, fb = taylor_features(a), taylor_features(b)
    assert fa.shape == (50, num_taylor_features(d)) == (50, 1 + d + d * (d + 1) // 2)
    dot = (a * b).sum(-1)
    torch.testing.assert_close(
        (fa * fb).sum(-1), 1 + dot / math.sqrt(d) + dot**2 / (2 * d), atol=1e-4, rtol=1e-5
    )
    assert ((fa * fb).sum(-1) >= 0.5 - 1e-5).all()


def test_based_init_keeps_whole_rotary_pairs_at_the_teachers_temperature():
    """W keeps d/2 whole rotary pairs (dims i, i + D/2), scaled so q W . k W / sqrt(d) is the teacher's
    q.k / sqrt(D) restricted to those pairs; init_from_teacher picks the pairs of largest q/k weight."""
    m = build_mixer("based", H, HKV, D, HIDDEN, 0, feature_dim=4)
    wq, wk = torch.zeros(H * D, HIDDEN), torch.ones(HKV * D, HIDDEN)
    for h in range(H):  # group g (heads 2g, 2g+1) favours rotary pairs 2+g and 5
        for i in (2 + h // 2, 5):
            wq[h * D + i] = wq[h * D + i + D // 2] = 3.0
    lin = lambda w: nn.Linear(HIDDEN, w.shape[0], bias=False).requires_grad_(False).eval()  # noqa: E731
    q_proj, k_proj = lin(wq), lin(wk)
    q_proj.weight.copy_(wq)
    k_proj.weight.copy_(wk)
    m.init_from_teacher(q_proj, k_proj, None)
    q, k, _, _ = inputs(6, seed=11)
    fq, fk = m.feature_map_q(q), repeat_kv(m.feature_map_k(k), H)
    kk = repeat_kv(k, H)
    for h in range(H):
        dims = [2 + h // 2, 5, 2 + h // 2 + D // 2, 5 + D // 2]
        partial = (q[:, h, :, None, dims] * kk[:, h, None, :, dims]).sum(-1) / math.sqrt(D)
        torch.testing.assert_close(
            fq[:, h] @ fk[:, h].transpose(-1, -2) / math.sqrt(4), partial, atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("name", ["based", "based-window"])
def test_based_attention_weights_match_forward(name):
    m = make_mixer(name, perturb=0.1)
    q, k, v, x = inputs(24, seed=12)
    with torch.no_grad():
        w = m.attention_weights(q, k)
        torch.testing.assert_close(w @ repeat_kv(v, H), m(q, k, v, x)[0], atol=1e-5, rtol=1e-4)
        assert (w >= 0).all()
