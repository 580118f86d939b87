"""The `delta` and `gated-delta` mixers: carry, padding, GQA, gradients, initialization, decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mixer_testing import HIDDEN, HKV, D, H, inputs, run_pieces, sl

from zoo.kernels.delta_rule import delta_rule_naive
from zoo.mixers import build_mixer, get_mixer, list_mixers
from zoo.mixers.delta import DeltaMixer, GatedDeltaMixer
from zoo.mixers.tokens import Tokens

NAMES = ["delta", "gated-delta"]


def make_mixer(name, seed=0, num_kv_heads=HKV, **options):
    """A mixer moved away from its (input-independent) init, so beta and the gate depend on x."""
    torch.manual_seed(seed)
    m = build_mixer(name, H, num_kv_heads, D, HIDDEN, 0, **options)
    with torch.no_grad():
        for pname, p in m.named_parameters():
            p.add_((0.3 if "map" in pname else 0.5) * torch.randn_like(p))
        if name == "gated-delta":
            m.dt_bias.add_(1.0)  # decay strong enough to matter over the test lengths
    return m


def test_registered_with_options_and_init():
    assert {"delta", "gated-delta"} <= set(list_mixers())
    assert get_mixer("delta") is DeltaMixer and get_mixer("gated-delta") is GatedDeltaMixer
    base = {"feature_dim": None, "feature_map": "silu", "beta_init": 0.5}
    assert DeltaMixer.options == base
    assert GatedDeltaMixer.options == {**base, "dt_min": 1e-3, "dt_max": 1e-1}
    for name in NAMES:
        cls = get_mixer(name)
        assert cls.family == "delta" and cls.description and "arXiv" in cls.source and "F*D" in cls.state_size
        with pytest.raises(ValueError, match="unknown option"):
            build_mixer(name, H, HKV, D, HIDDEN, 0, windw=8)
        with pytest.raises(ValueError, match="feature_map"):
            build_mixer(name, H, HKV, D, HIDDEN, 0, feature_map="tanh")
    m = build_mixer("delta", H, HKV, D, HIDDEN, 0, beta_init=0.2)
    names = {n for n, _ in m.named_parameters()}
    assert names == {"q_map.weight", "k_map.weight", "beta_proj.weight", "beta_proj.bias"}
    assert m.q_map.weight.shape == (H, D, D) and m.k_map.weight.shape == (HKV, D, D)
    q, k, v, x = inputs(5)
    beta = torch.sigmoid(m.read_x(m.beta_proj, x))
    torch.testing.assert_close(beta, torch.full_like(beta, 0.2))  # the same write strength for every token
    g = build_mixer("gated-delta", H, HKV, D, HIDDEN, 0, dt_min=1e-3, dt_max=1e-1)
    lg = g.log_gate(Tokens.of(q, x, None))
    assert lg.shape == (2, H, 5) and (lg < 0).all()
    # near no decay, spread log-uniformly over the heads: -log g from 1e-3 (head 0) to 1e-1 (last head)
    torch.testing.assert_close(-lg[0, :, 0], torch.logspace(-3, -1, H), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="dt_min"):
        build_mixer("gated-delta", H, HKV, D, HIDDEN, 0, dt_min=0.2, dt_max=0.1)


@pytest.mark.parametrize("name", NAMES)
def test_matches_the_reference_recurrence(name):
    """The mixer is phi(q), phi(k) (unit norm, repeated), beta and gate fed to the delta rule."""
    m = make_mixer(name)
    q, k, v, x = inputs(40)
    with torch.no_grad():
        y, s = m(q, k, v, x)
        fq = F.normalize(F.silu(q @ m.q_map.weight), dim=-1)
        fk = F.normalize(F.silu(k @ m.k_map.weight), dim=-1).repeat_interleave(H // HKV, 1)
        beta = torch.sigmoid(x @ m.beta_proj.weight.T + m.beta_proj.bias).transpose(1, 2)
        lg = None
        if name == "gated-delta":
            dt = F.softplus((x @ m.a_proj.weight.T).transpose(1, 2) + m.dt_bias[:, None])
            lg = -m.A_log.exp()[:, None] * dt
        y0, s0 = delta_rule_naive(fq, fk, v.repeat_interleave(H // HKV, 1), beta, lg)
    torch.testing.assert_close(y, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_split_and_carry(name):
    m = make_mixer(name)
    T = 150
    q, k, v, x = inputs(T)
    with torch.no_grad():
        y_all, s_all = m(q, k, v, x)
        cuts = [0, 1, 70, 149, T]  # one token (step form), 69 and 79 (chunked), one again
        y_pieces, st = run_pieces(m, (q, k, v, x), cuts)
    torch.testing.assert_close(y_pieces, y_all, atol=1e-5, rtol=1e-5)
    assert st.dtype == torch.float32 and st.shape == (2, H, D, D)
    torch.testing.assert_close(st, s_all, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_left_padding_adds_nothing(name):
    m = make_mixer(name)
    T, pad = 70, 9
    q, k, v, x = inputs(T)
    # padded positions carry junk (large values): they must not reach anything
    q2, k2, v2, x2 = (
        torch.cat([torch.randn_like(sl(t, 0, pad)) * 50, t], t.dim() - 2 if t.dim() == 4 else 1)
        for t in (q, k, v, x)
    )
    mask = torch.ones(2, T + pad, dtype=torch.long)
    mask[:, :pad] = 0
    mask[1, pad - 3 : pad] = 1  # row 1 has 3 real tokens more at the front
    with torch.no_grad():
        y_ref, s_ref = m(q, k, v, x)
        y_pad, s_pad = m(q2, k2, v2, x2, mask=mask)
        y_ref1, s_ref1 = m(*(sl(t, pad - 3, T + pad)[1:] for t in (q2, k2, v2, x2)))
        assert torch.isfinite(y_pad).all()
        torch.testing.assert_close(y_pad[0:1, :, pad:], y_ref[0:1], atol=1e-5, rtol=1e-5)
        # row 1's first 3 real tokens are the large ones (x50): its outputs reach ~80, and the chunks fall
        # elsewhere in its tokens than in the reference's, so fp32 rounding is judged at that scale
        scale = y_ref1.abs().max().item()
        torch.testing.assert_close(y_pad[1:, :, pad - 3 :], y_ref1, atol=1e-6 * scale, rtol=1e-5)
        assert torch.all(y_pad[0, :, :pad] == 0)
        torch.testing.assert_close(s_pad[0:1], s_ref[0:1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s_pad[1:], s_ref1, atol=1e-5, rtol=1e-5)
        # decoding on from the padded state continues both rows exactly
        q3, k3, v3, x3 = inputs(5, seed=9)
        y3, _ = m(q3, k3, v3, x3, state=s_pad)
        y3r, _ = m(q3[:1], k3[:1], v3[:1], x3[:1], state=s_ref[:1])
        y3r1, _ = m(q3[1:], k3[1:], v3[1:], x3[1:], state=s_ref1)
    torch.testing.assert_close(y3, torch.cat([y3r, y3r1]), atol=1e-5, rtol=1e-5)
    # a padded position in the middle of a decode batch (mask 0 there) changes no state
    with torch.no_grad():
        _, s_skip = m(
            q3[:, :, :1],
            k3[:, :, :1] * 50,
            v3[:, :, :1],
            x3[:, :1],
            state=s_pad,
            mask=torch.zeros(2, 1, dtype=torch.long),
        )
    torch.testing.assert_close(s_skip, s_pad, atol=0, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_gqa_shapes_and_equals_repeated_heads(name):
    m = make_mixer(name)
    full = build_mixer(name, H, H, D, HIDDEN, 0)
    # the key map is per key/value head: each serves its query group
    full.load_state_dict(
        {
            key: t.repeat_interleave(H // HKV, 0) if key.startswith("k_map") else t
            for key, t in m.state_dict().items()
        }
    )
    q, k, v, x = inputs(40)
    with torch.no_grad():
        y, s = m(q, k, v, x)
        y_full, s_full = full(q, k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1), x)
    assert y.shape == (2, H, 40, D) and s.shape == (2, H, D, D)
    torch.testing.assert_close(y, y_full)
    torch.testing.assert_close(s, s_full)
    m = build_mixer(name, H, 1, D, HIDDEN, 0, feature_dim=24)  # multi-query, wider features
    q, k, v, x = inputs(20, hkv=1)
    y, s = m(q, k, v, x)
    assert y.shape == (2, H, 20, D) and s.shape == (2, H, 24, D)


@pytest.mark.parametrize("feature_map", ["identity", "silu", "relu", "hedgehog"])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_all_parameters(name, feature_map):
    m = make_mixer(name, feature_map=feature_map)
    q, k, v, x = inputs(80)
    q.requires_grad_(True)
    x.requires_grad_(True)
    y, s = m(q, k, v, x)
    ((y**2).mean() + (s**2).mean()).backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    assert q.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    if feature_map == "hedgehog":
        assert s.shape == (2, H, 2 * D, D)
    # at the untouched init too (W_beta, W_a at 0): gradients flow to every parameter
    m = build_mixer(name, H, HKV, D, HIDDEN, 0, feature_map=feature_map)
    y, _ = m(*inputs(80))
    (y**2).mean().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", NAMES)
def test_decode_one_at_a_time_keeps_state_size(name):
    m = make_mixer(name)
    T0, steps = 20, 60
    q, k, v, x = inputs(T0 + steps, Bsz=1)
    with torch.no_grad():
        y_all, s_all = m(q, k, v, x)
        y0, st = m(sl(q, 0, T0), sl(k, 0, T0), sl(v, 0, T0), sl(x, 0, T0))
        ys = [y0]
        for t in range(T0, T0 + steps):
            y, st = m(sl(q, t, t + 1), sl(k, t, t + 1), sl(v, t, t + 1), sl(x, t, t + 1), state=st)
            ys.append(y)
            assert st.shape == (1, H, D, D)
    torch.testing.assert_close(torch.cat(ys, 2), y_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st, s_all, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_inputs(name):
    m = make_mixer(name)
    q, k, v, x = inputs(50)
    with torch.no_grad():
        y32, _ = m(q, k, v, x)
        y16, st = m(q.bfloat16(), k.bfloat16(), v.bfloat16(), x.bfloat16())
        m16 = make_mixer(name).bfloat16()  # a bf16 model: parameters in bf16, maths in fp32
        y16b, _ = m16(q.bfloat16(), k.bfloat16(), v.bfloat16(), x.bfloat16())
    assert y16.dtype == y16b.dtype == torch.bfloat16 and st.dtype == torch.float32
    torch.testing.assert_close(y16.float(), y32, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(y16b.float(), y32, atol=1e-1, rtol=1e-1)


def test_state_stays_bounded_over_a_long_sequence():
    # no normalizer, yet |S| stays of the order of |v| (about 6 here at any length, where a sum of
    # k v^T reaches ~1000): each L2-normed write replaces what was there instead of adding to it
    m = make_mixer("delta")
    q, k, v, x = inputs(2000, Bsz=1)
    with torch.no_grad():
        y, s = m(q, k, v, x)
    assert torch.isfinite(y).all()
    assert torch.linalg.matrix_norm(s, ord=2).max() < 3 * v.abs().max()
