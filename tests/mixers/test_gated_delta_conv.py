"""`gated-delta-conv`: the definition written out, its start, carrying the convs' history, padding,
GQA, gradients, and the degenerate case that is `gated-delta`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mixer_testing import HIDDEN, HKV, D, H, assert_bf16_inputs_follow_fp32, inputs, part, run_pieces

from zoo.cache import state_bytes
from zoo.kernels.delta_rule import delta_rule_naive
from zoo.mixers import build_mixer, get_mixer
from zoo.mixers.gated_delta_conv import GatedDeltaConvMixer, GatedDeltaConvState

NAME = "gated-delta-conv"
G = H // HKV


def make_mixer(seed=0, num_kv_heads=HKV, **options):
    """A mixer moved away from its init: the convs mix tokens, the gate and beta depend on x."""
    torch.manual_seed(seed)
    m = build_mixer(NAME, H, num_kv_heads, D, HIDDEN, 0, feature_dim=24, **options)
    with torch.no_grad():
        for pname, p in m.named_parameters():
            p.add_((0.3 if "map" in pname or "conv" in pname else 0.5) * torch.randn_like(p))
        m.dt_bias.add_(1.0)  # decay strong enough to matter over the test lengths
    return m


def naive_conv(x, w):
    """x [B, h, T, D], w [h, D, K] (tap K-1: the current token), zeros before the start."""
    K = w.shape[-1]
    return sum(w[None, :, None, :, K - 1 - j] * F.pad(x, (0, 0, j, 0))[:, :, : x.shape[2]] for j in range(K))


def reference(m, q, k, v, x):
    """The docstring's formula, one memory at a time, with the fp32 loop form of the delta rule."""
    qc, kc, vc = naive_conv(q, m.conv_q), naive_conv(k, m.conv_k), naive_conv(v, m.conv_v)
    Hkv = k.shape[1]
    y = 0.0
    for i in range(m.memories):
        rows, kv_rows = slice(i * H, (i + 1) * H), slice(i * Hkv, (i + 1) * Hkv)
        fq = F.normalize(F.silu(qc @ m.q_map.weight[rows]), dim=-1)
        fk = F.normalize(F.silu(kc @ m.k_map.weight[kv_rows]), dim=-1).repeat_interleave(H // Hkv, 1)
        beta = torch.sigmoid(x @ m.beta_proj.weight[rows].T + m.beta_proj.bias[rows]).transpose(1, 2)
        dt = F.softplus((x @ m.a_proj.weight[rows].T).transpose(1, 2) + m.dt_bias[rows, None])
        y_i, _ = delta_rule_naive(
            fq, fk, vc.repeat_interleave(H // Hkv, 1), beta, -m.A_log[rows].exp()[:, None] * dt
        )
        y = y + m.memory_weight[i][:, None, None] * y_i
    gate = 2 * torch.sigmoid(x @ m.gate_proj.weight.T + m.gate_proj.bias).transpose(1, 2)
    y = y * gate[..., None] + naive_conv(vc.repeat_interleave(H // Hkv, 1), m.conv_o)
    share = torch.sigmoid(x @ m.sink_proj.weight.T + m.sink_proj.bias).transpose(1, 2)[..., None]
    v1 = v[:, :, :1].repeat_interleave(H // Hkv, 1)  # the first token's value
    y = (1 - share) * y + share * v1
    y[:, :, :1] = v1  # the first token: its own value
    return y


def assert_states_close(a, b, atol=1e-5):
    assert type(a) is type(b) is GatedDeltaConvState
    for name, x, y in zip(a._fields, a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5, msg=lambda msg, name=name: f"{name}: {msg}")


def test_registered_options_and_errors():
    cls = get_mixer(NAME)
    assert cls is GatedDeltaConvMixer and cls.family == "delta" and "arXiv" in cls.source
    assert cls.options == {
        "feature_dim": 128,
        "feature_map": "silu",
        "beta_init": 0.5,
        "decays": [[1e-3, 1e-1], [5e-2, 5e-1]],
        "conv_size": 8,
    }
    for bad, match in (
        ({"decays": []}, "decays"),
        ({"decays": [[0.1]]}, "decays"),
        ({"decays": 0.1}, "decays"),
        ({"decays": [[0.2, 0.1]]}, "dt_min"),
        ({"decays": [[0.0, 0.1]]}, "dt_min"),
        ({"conv_size": 0}, "conv_size"),
        ({"dt_min": 1e-3}, "unknown option"),
    ):
        with pytest.raises(ValueError, match=match):
            build_mixer(NAME, H, HKV, D, HIDDEN, 0, **bad)


def test_start_is_the_mean_of_the_memories_without_mixing_tokens():
    """At the start the convs pass each token through, the output conv adds nothing, the gate is 1 and
    each of the M memories weighs 1/M; its heads' decays start at their memory's range."""
    m = build_mixer(NAME, H, HKV, D, HIDDEN, 0, feature_dim=24, decays=[[1e-3, 1e-2], [0.1, 1.0], [1.0, 2.0]])
    assert (
        m.memories == 3
        and m.q_map.weight.shape == (3 * H, D, 24)
        and m.k_map.weight.shape == (3 * HKV, D, 24)
    )
    assert not m.conv_o.any() and torch.equal(m.memory_weight, torch.full((3, H), 1 / 3))
    torch.testing.assert_close(
        F.softplus(m.dt_bias),
        torch.cat(
            [torch.logspace(-3, -2, H), torch.logspace(-1, 0, H), torch.logspace(0, math.log10(2.0), H)]
        ),
    )
    q, k, v, x = inputs(30, seed=3)
    with torch.no_grad():
        assert torch.equal(naive_conv(q, m.conv_q), q) and torch.equal(naive_conv(k, m.conv_k), k)
        y, _ = m(q, k, v, x)
        torch.testing.assert_close(y, reference(m, q, k, v, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [HKV, 1, H])
def test_matches_the_definition(num_kv_heads):
    m = make_mixer(num_kv_heads=num_kv_heads)
    q, k, v, x = inputs(70, hkv=num_kv_heads)
    with torch.no_grad():
        y, s = m(q, k, v, x)
        y_ref = reference(m, q, k, v, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    kept = m.conv_size - 1
    assert m.conv_size == 8 and s.S.shape == (2, 2 * H, 24, D) and s.conv_q.shape == (2, H, kept, D)
    assert s.conv_k.shape == s.conv_v.shape == s.conv_o.shape == (2, num_kv_heads, kept, D)
    torch.testing.assert_close(s.conv_k, k[:, :, -kept:])  # the history: the last real inputs


@pytest.mark.parametrize("cuts", [[0, 1, 2, 3, 70, 149, 150], [0, 64, 65, 150], list(range(0, 151, 2))])
def test_split_and_carry(cuts):
    """Pieces shorter than the convs (1, 2 tokens), across the delta rule's 64-token chunks, token pairs."""
    m = make_mixer()
    ts = inputs(150)
    with torch.no_grad():
        y_all, s_all = m(*ts)
        y_pieces, st = run_pieces(m, ts, cuts)
    torch.testing.assert_close(
        y_pieces, y_all, atol=5e-5, rtol=1e-4
    )  # the delta rule's chunked vs step forms
    assert_states_close(st, s_all, atol=5e-5)


def test_padding_anywhere_adds_nothing():
    """Pads (junk values, mask 0) at the front and in the middle: the real tokens' outputs and the state
    are those of the real tokens alone, and decoding on from the padded state continues exactly."""
    m = make_mixer()
    q, k, v, x = inputs(40, Bsz=1, seed=4)
    mask = torch.ones(1, 40, dtype=torch.long)
    mask[0, :5] = 0
    mask[0, 17:20] = 0
    keep = mask[0].bool()
    junk = [t.clone() for t in (q, k, v, x)]
    for t in junk:
        idx = (slice(None), slice(None), ~keep) if t.dim() == 4 else (slice(None), ~keep)
        t[idx] = 50 * torch.randn_like(t[idx])
    with torch.no_grad():
        y_pad, s_pad = m(*junk, mask=mask)
        y_ref, s_ref = m(q[:, :, keep], k[:, :, keep], v[:, :, keep], x[:, keep])
        torch.testing.assert_close(y_pad[:, :, keep], y_ref, atol=1e-5, rtol=1e-5)
        assert not y_pad[:, :, ~keep].any()
        assert_states_close(s_pad, s_ref)
        more = inputs(3, Bsz=1, seed=5)
        torch.testing.assert_close(m(*more, state=s_pad)[0], m(*more, state=s_ref)[0], atol=1e-5, rtol=1e-5)
        # a decode step that is padding (mask 0) changes no state
        _, s_skip = m(*part(more, 0, 1), state=s_pad, mask=torch.zeros(1, 1, dtype=torch.long))
    assert_states_close(s_skip, s_pad, atol=0)


def test_state_is_constant_in_the_context():
    m = make_mixer()
    ts = inputs(300, Bsz=1)
    with torch.no_grad():
        short = state_bytes(m(*part(ts, 0, 10))[1])
        long = state_bytes(m(*ts)[1])
    # two memories of [24, D] per query head, four histories of 7 tokens (8 taps), the first value: fp32;
    # the count: int64
    assert short == long == 4 * (2 * H * 24 * D + 7 * D * (H + 3 * HKV) + HKV * D) + 8


def test_gradients_reach_all_parameters():
    for m in (make_mixer(), build_mixer(NAME, H, HKV, D, HIDDEN, 0)):  # moved away from the init, and at it
        q, k, v, x = inputs(80)
        y, s = m(q, k, v, x)
        ((y**2).mean() + (s.S**2).mean()).backward()
        for pname, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_one_memory_without_convs_is_gated_delta():
    """conv_size 1 (each token alone), one memory, the gate and output conv untouched, no share of the first
    token's value: `gated-delta`, but for the first token, whose output is its value."""
    m = build_mixer(NAME, H, HKV, D, HIDDEN, 0, feature_dim=None, decays=[[1e-3, 1e-1]], conv_size=1)
    g = build_mixer("gated-delta", H, HKV, D, HIDDEN, 0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in g.named_parameters():
            p.add_(0.3 * torch.randn_like(p))
            m.get_parameter(name).copy_(p)
        m.sink_proj.bias.fill_(-1e4)  # a share of exactly 0
        q, k, v, x = inputs(50)
        y, s = m(q, k, v, x)
        y_g, s_g = g(q, k, v, x)
    torch.testing.assert_close(y[:, :, 1:], y_g[:, :, 1:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y[:, :, 0], v[:, :, 0].repeat_interleave(G, 1), atol=0, rtol=0)
    assert not torch.allclose(y_g[:, :, 0], y[:, :, 0])
    torch.testing.assert_close(s.S, s_g, atol=1e-6, rtol=1e-6)


def test_bf16_inputs():
    assert_bf16_inputs_follow_fp32(make_mixer(), inputs(50), lambda st: st.S)


def test_first_real_token_outputs_its_value_wherever_it_comes():
    """In the first call, after padding, or in a later call when earlier calls held only padding."""
    m = make_mixer()
    q, k, v, x = inputs(12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    vv = v.repeat_interleave(G, 1)
    with torch.no_grad():
        y, _ = m(q, k, v, x, mask=mask)
        torch.testing.assert_close(y[0, :, 0], vv[0, :, 0], atol=0, rtol=0)
        torch.testing.assert_close(y[1, :, 4], vv[1, :, 4], atol=0, rtol=0)
        assert not torch.allclose(y[0, :, 1], vv[0, :, 1])  # later tokens are the memories'
        _, s = m(*part((q, k, v, x), 0, 3), mask=torch.zeros(2, 3, dtype=torch.long))
        assert s.seen.tolist() == [0, 0]
        y2, s2 = m(*part((q, k, v, x), 3, 12), state=s)
        torch.testing.assert_close(y2[:, :, 0], vv[:, :, 3], atol=0, rtol=0)
        assert s2.seen.tolist() == [9, 9]
