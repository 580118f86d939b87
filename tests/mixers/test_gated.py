"""The gated mixers `gla`, `liger-gla`, `liger`, `retention`: carry, padding, GQA, gradients, decoding,
decay."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mixer_testing import HIDDEN, HKV, D, H, assert_bf16_inputs_follow_fp32, run_pieces, sl
from mixer_testing import inputs as seeded_inputs

from zoo.cache import map_state
from zoo.kernels.linear_attention import LinearAttentionState
from zoo.mixers import build_mixer, get_mixer, list_mixers
from zoo.mixers.liger import LigerState, rotary_pair_rms
from zoo.mixers.tokens import Tokens

NAMES = ["gla", "liger-gla", "liger", "retention"]
TOL = dict(atol=1e-5, rtol=1e-5)


def small(name, **options):
    """Short windows, so the tests run past them."""
    return {"window": 16, **options} if "window" in get_mixer(name).options else options


def make_mixer(name, seed=0, num_kv_heads=HKV, perturb=True, **options):
    torch.manual_seed(seed)
    m = build_mixer(name, H, num_kv_heads, D, HIDDEN, 0, **small(name, **options))
    if perturb and name == "gla":  # off the symmetric start, with real (not ~1) data-dependent decays
        with torch.no_grad():
            for p in (m.feature_map_q.weight, m.feature_map_k.weight):
                p.add_(0.3 * torch.randn_like(p))
            m.gate_up.weight.normal_(std=0.5)
            m.gate_up.bias.normal_(1.0, 1.0)
    return m


def inputs(T, Bsz=2, seed=1, hkv=HKV):
    q, k, v, x = seeded_inputs(T, Bsz, seed, hkv)
    return q, k * 2, v, x  # spread the key magnitudes, so liger gates vary


def rows(t, lo, hi):
    return t[lo:hi]


def state_tensors(s):
    """Named tensors of any of these mixers' states."""
    if isinstance(s, LinearAttentionState):
        return {"S": s.S, "z": s.z}
    assert isinstance(s, LigerState)
    w = s.window
    return {
        "S": s.linear.S,
        "z": s.linear.z,
        "wk": w.k,
        "wv": w.v,
        "wfk": w.fk,
        "wS": w.S,
        "wz": w.z,
        "wn": w.n,
    }


def assert_state_close(s1, s2, **tol):
    a, b = state_tensors(s1), state_tensors(s2)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **(tol or TOL), msg=lambda m, key=key: f"state.{key}: {m}")


def state_rows(s, lo, hi):
    return map_state(lambda t: t[lo:hi], s)


def gated_reference(fq, fk, v, log_gate, eps=1e-6):
    """Quadratic reference: y_i = sum_{j<=i} w_ij v_j / sum_j w_ij, w_ij = sum_f fq_if fk_jf exp(sum_{j<s<=i}
    g_sf)."""
    T = fq.shape[2]
    if log_gate is None:
        log_gate = torch.zeros(fq.shape[:3])
    if log_gate.dim() == 3:
        log_gate = log_gate[..., None].expand_as(fq)
    b = log_gate.double().cumsum(2)  # [B, H, T, F]
    decay = (b[:, :, :, None, :] - b[:, :, None, :, :]).clamp(max=0).exp()  # [B, H, Ti, Tj, F]
    w = (fq.double()[:, :, :, None, :] * fk.double()[:, :, None, :, :] * decay).sum(-1)
    w = w.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), 0.0)
    return ((w @ v.double()) / (w.sum(-1, keepdim=True) + eps)).float()


def window_reference(q, k, v, W, sinks=0):
    """Softmax over the last W keys and the first `sinks`, as a masked full attention."""
    T = q.shape[2]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    seen = (j <= i) & ((i - j < W) | (j < sinks))
    s = (q @ k.transpose(-1, -2) * D**-0.5).masked_fill(~seen, float("-inf"))
    return s.softmax(-1) @ v


def test_registered_with_attributes_and_options():
    assert set(NAMES) <= set(list_mixers())
    expected = {
        "gla": {"feature_dim": None, "rank": 16, "tau": 16.0, "gate_bias": 6.0},
        "liger-gla": {"tau": 16.0},
        "liger": {"tau": 16.0, "window": 64, "alpha": 0.5, "sinks": 0, "learn_alpha": False},
        "retention": {"first_exponent": 5.0, "exponent_step": 1.0},
    }
    for name in NAMES:
        cls = get_mixer(name)
        assert cls.options == expected[name]
        assert cls.family == ("hybrid" if name == "liger" else "gated")
        assert cls.description and cls.source and cls.state_size not in ("", "?")
        with pytest.raises(ValueError, match="unknown option"):
            build_mixer(name, H, HKV, D, HIDDEN, 0, no_such_option=1)
    assert "W" in get_mixer("liger").state_size


def test_parameter_free_mixers_add_nothing():
    for name in ("liger-gla", "liger", "retention"):
        m = build_mixer(name, H, HKV, D, HIDDEN, 0)
        assert list(m.parameters()) == [] and list(m.buffers()) == [] and m.state_dict() == {}, name
    gla = build_mixer("gla", H, HKV, D, HIDDEN, 0, feature_dim=8, rank=4)
    shapes = {n: tuple(p.shape) for n, p in gla.named_parameters()}
    assert shapes == {
        "feature_map_q.weight": (H, D, 8),
        "feature_map_k.weight": (HKV, D, 8),
        "gate_down.weight": (4, HIDDEN),
        "gate_up.weight": (H * 16, 4),
        "gate_up.bias": (H * 16,),
    }


@pytest.mark.parametrize("name", NAMES)
def test_split_and_carry(name):
    m = make_mixer(name)
    T = 150
    q, k, v, x = inputs(T)
    with torch.no_grad():
        y_all, s_all = m(q, k, v, x)
        cuts = [0, 1, 70, 149, T]
        y_pieces, st = run_pieces(m, (q, k, v, x), cuts)
    torch.testing.assert_close(y_pieces, y_all, **TOL)
    assert_state_close(st, s_all)


@pytest.mark.parametrize("name", NAMES)
def test_left_padding_adds_nothing(name):
    m = make_mixer(name)
    T, pad = 70, 9
    q, k, v, x = inputs(T)
    q2, k2, v2, x2 = (
        torch.cat([torch.randn_like(sl(t, 0, pad)) * 50, t], 1 if t.dim() == 3 else 2) for t in (q, k, v, x)
    )
    mask = torch.ones(2, T + pad, dtype=torch.long)
    mask[:, :pad] = 0
    mask[1, pad - 3 : pad] = 1  # row 1 has 3 real tokens more at the front
    with torch.no_grad():
        y_ref, s_ref = m(q, k, v, x)
        y_pad, s_pad = m(q2, k2, v2, x2, mask=mask)
        y_ref1, s_ref1 = m(*(rows(sl(t, pad - 3, T + pad), 1, 2) for t in (q2, k2, v2, x2)))
    torch.testing.assert_close(y_pad[0:1, :, pad:], y_ref[0:1], **TOL)
    torch.testing.assert_close(y_pad[1:, :, pad - 3 :], y_ref1, **TOL)
    assert torch.all(y_pad[0, :, :pad] == 0)
    assert_state_close(state_rows(s_pad, 0, 1), state_rows(s_ref, 0, 1))
    assert_state_close(state_rows(s_pad, 1, 2), s_ref1)
    # decoding on from the padded state continues both rows exactly
    q3, k3, v3, x3 = inputs(5, seed=9)
    with torch.no_grad():
        y3, _ = m(q3, k3, v3, x3, state=s_pad)
        y3r, _ = m(*(rows(t, 0, 1) for t in (q3, k3, v3, x3)), state=state_rows(s_ref, 0, 1))
        y3r1, _ = m(*(rows(t, 1, 2) for t in (q3, k3, v3, x3)), state=s_ref1)
    torch.testing.assert_close(y3, torch.cat([y3r, y3r1]), **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_padding_inside_neither_writes_nor_decays(name):
    """Padded tokens between real ones (after a state exists) leave outputs and state as without them."""
    m = make_mixer(name)
    T, at, n = 60, 25, 7
    q, k, v, x = inputs(T)
    junk = inputs(n, seed=5)
    q2, k2, v2, x2 = (
        torch.cat([sl(t, 0, at), j * 50, sl(t, at, T)], 1 if t.dim() == 3 else 2)
        for t, j in zip((q, k, v, x), junk)
    )
    mask = torch.ones(2, T + n, dtype=torch.long)
    mask[:, at : at + n] = 0
    with torch.no_grad():
        y_ref, s_ref = m(q, k, v, x)
        y_pad, s_pad = m(q2, k2, v2, x2, mask=mask)
    real = mask[0].bool()
    torch.testing.assert_close(y_pad[:, :, real], y_ref, **TOL)
    assert_state_close(s_pad, s_ref)


@pytest.mark.parametrize("name", NAMES)
def test_gqa_equals_repeated_heads(name):
    m = make_mixer(name)
    full = build_mixer(name, H, H, D, HIDDEN, 0, **small(name))
    # the key feature map is per key/value head: each serves its query group; gates are per query head
    full.load_state_dict(
        {
            key: t.repeat_interleave(H // HKV, 0) if key.startswith("feature_map_k") else t
            for key, t in m.state_dict().items()
        }
    )
    q, k, v, x = inputs(40)
    with torch.no_grad():
        y, st = m(q, k, v, x)
        y_full, st_full = full(q, k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1), x)
    assert y.shape == (2, H, 40, D)
    torch.testing.assert_close(y, y_full, **TOL)
    # gates shared by a query group (liger's, pooled from k) let it share one state, kept per key/value head
    s, s_full = state_tensors(st), state_tensors(st_full)
    heads = HKV if m.gates_per_kv_head else H
    assert s["S"].shape[:2] == (2, heads) and s["S"].shape[-1] == D and s["S"].dtype == torch.float32
    assert m.gates_per_kv_head == (name in ("liger-gla", "liger"))
    for key, t in s.items():
        if key != "wn":  # the window's state is per key/value head in liger too
            per_group = s_full[key][:, :: H // HKV] if t.shape[1] == HKV else s_full[key]
            torch.testing.assert_close(t, per_group, **TOL, msg=lambda msg, key=key: f"state {key}: {msg}")


@pytest.mark.parametrize("name", ["gla", "liger-gla", "retention"])
def test_matches_quadratic_reference(name):
    m = make_mixer(name)
    q, k, v, x = inputs(30)
    with torch.no_grad():
        y, _ = m(q, k, v, x)
        fq, fk, vr, g = m.gated_inputs(q, k, v, Tokens.of(q, x, None))
    torch.testing.assert_close(y, gated_reference(fq, fk, vr, g), **TOL)


def test_liger_blends_gated_recurrence_and_window_softmax():
    m, gated = make_mixer("liger", alpha=0.3), make_mixer("liger-gla")
    q, k, v, x = inputs(50)
    kr, vr = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    with torch.no_grad():
        y_g, _ = gated(q, k, v, x)
        y_w = window_reference(q, kr, vr, 16)
        torch.testing.assert_close(m(q, k, v, x)[0], 0.3 * y_g + 0.7 * y_w, **TOL)
        m.branch = "window"
        torch.testing.assert_close(m(q, k, v, x)[0], y_w, **TOL)
        m.branch = "linear"
        y_l, st = m(*(sl(t, 0, 11) for t in (q, k, v, x)))
        y_l2, _ = m(*(sl(t, 11, 50) for t in (q, k, v, x)), state=st)
        torch.testing.assert_close(torch.cat([y_l, y_l2], 2), y_g, **TOL)
        m.branch = "neither"
        with pytest.raises(ValueError, match="branch"):
            m(q, k, v, x)


def test_liger_sinks_join_the_window_branch_only():
    """With sinks, liger's window branch is softmax over the window and the first tokens; the gated branch
    is unchanged, and decoding token by token gives the same outputs."""
    m, gated = make_mixer("liger", alpha=0.3, sinks=3), make_mixer("liger-gla")
    q, k, v, x = inputs(50)
    kr, vr = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    with torch.no_grad():
        y_g, _ = gated(q, k, v, x)
        y_w = window_reference(q, kr, vr, 16, sinks=3)
        assert (y_w - window_reference(q, kr, vr, 16)).abs().max() > 1e-3  # the sinks matter here
        y_all, _ = m(q, k, v, x)
        torch.testing.assert_close(y_all, 0.3 * y_g + 0.7 * y_w, **TOL)
        y0, st = m(*(sl(t, 0, 20) for t in (q, k, v, x)))
        ys = [y0]
        for t in range(20, 50):
            y, st = m(*(sl(u, t, t + 1) for u in (q, k, v, x)), state=st)
            ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 2), y_all, **TOL)


def test_liger_learned_alpha_starts_at_alpha_and_blends_per_head():
    """learn_alpha: one trained weight per query head, starting at `alpha` (the same output as the fixed
    mix), reached by gradients, and each head blending its two branches by its own weight."""
    fixed = make_mixer("liger", alpha=0.3)
    learned = make_mixer("liger", alpha=0.3, learn_alpha=True)
    assert [n for n, _ in learned.named_parameters()] == ["alpha_logit"]
    assert not list(fixed.parameters())
    q, k, v, x = inputs(40)
    with torch.no_grad():
        torch.testing.assert_close(learned(q, k, v, x)[0], fixed(q, k, v, x)[0], **TOL)
    learned(q, k, v, x)[0].square().sum().backward()
    assert learned.alpha_logit.grad is not None and bool(learned.alpha_logit.grad.abs().gt(0).all())
    weights = torch.linspace(0.1, 0.9, H)
    with torch.no_grad():
        learned.alpha_logit.copy_(torch.logit(weights) / learned.ALPHA_STEP)
        y = learned(q, k, v, x)[0]
        learned.branch = "linear"
        y_g = learned(q, k, v, x)[0]
        learned.branch = "window"
        y_w = learned(q, k, v, x)[0]
    w = weights[:, None, None]
    torch.testing.assert_close(y, w * y_g + (1 - w) * y_w, **TOL)
    with pytest.raises(ValueError, match="learn_alpha needs 0 < alpha < 1"):
        make_mixer("liger", alpha=1.0, learn_alpha=True)


def test_liger_decode_equals_full_forward_with_bounded_state():
    m = make_mixer("liger")  # window 16
    T0, steps = 20, 100
    q, k, v, x = inputs(T0 + steps, Bsz=1)
    with torch.no_grad():
        y_all, s_all = m(q, k, v, x)
        y0, st = m(*(sl(t, 0, T0) for t in (q, k, v, x)))
        ys, prefilled, sizes = [y0], st.nbytes(), set()
        slots = sum(t.numel() * t.element_size() for t in (st.window.k, st.window.v, st.window.fk))
        for t in range(T0, T0 + steps):
            y, st = m(*(sl(u, t, t + 1) for u in (q, k, v, x)), state=st)
            ys.append(y)
            assert st.window.cached_tokens == 16
            sizes.add(st.nbytes())
    # constant while decoding; decoding in place adds room for an eighth of the window's slots at most
    assert len(sizes) == 1 and prefilled <= sizes.pop() <= prefilled + slots // 8
    torch.testing.assert_close(torch.cat(ys, 2), y_all, **TOL)
    assert_state_close(st, s_all)
    assert int(st.window.n) == T0 + steps


def test_gla_gradients_reach_all_parameters_from_the_start():
    m = make_mixer("gla", perturb=False)
    q, k, v, x = inputs(80)
    q.requires_grad_(True)
    y, _ = m(q, k, v, x)
    (y**2).mean().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    assert q.grad.abs().sum() > 0


def test_gla_starts_as_ungated_hedgehog():
    q, k, v, x = inputs(150)
    hedgehog = build_mixer("hedgehog", H, HKV, D, HIDDEN, 0)
    with torch.no_grad():
        y_h, _ = hedgehog(q, k, v, x)
        y_exact, _ = make_mixer("gla", perturb=False, gate_bias=30.0)(q, k, v, x)
        gla = make_mixer("gla", perturb=False)
        y_start, _ = gla(q, k, v, x)
        g = gla.log_gate(q, k, Tokens.of(q, x, None))
    torch.testing.assert_close(y_exact, y_h, **TOL)
    assert g.shape == (2, H, 150, 2 * D) and bool((g < 0).all())
    assert float(g.min()) > 2 * F.logsigmoid(torch.tensor(6.0)).item() / 16  # decay ~1.5e-4 per token
    assert (y_start - y_h).abs().max() < 0.05


def test_liger_gate_ignores_rope():
    """Rotating each pair (d, d + D/2) of the keys by any angle (what RoPE does) leaves the gates
    unchanged."""
    m = make_mixer("liger-gla")
    q, k, v, x = inputs(20)
    theta = torch.rand(1, 1, 20, D // 2) * 2 * math.pi
    a, b = k[..., : D // 2], k[..., D // 2 :]
    k_rot = torch.cat([a * theta.cos() - b * theta.sin(), a * theta.sin() + b * theta.cos()], -1)
    tokens = Tokens.of(q, x, None)
    torch.testing.assert_close(m.log_gate(q, k_rot, tokens), m.log_gate(q, k, tokens), **TOL)
    torch.testing.assert_close(rotary_pair_rms(k_rot), rotary_pair_rms(k), **TOL)
    g = m.log_gate(q, k, tokens)
    assert g.shape == (2, H, 20, D) and bool((g <= 0).all()) and float(g.min()) >= math.log(0.5) / 16 - 1e-7


def test_retention_decays():
    m = make_mixer("retention")
    gammas = m.gammas()
    torch.testing.assert_close(gammas, 1 - 2.0 ** -(5 + torch.arange(H, dtype=torch.float64)))
    flat = make_mixer("retention", first_exponent=60.0, exponent_step=0.0)  # gamma = 1: no decay
    T = 150
    q, k, v, x = inputs(T, Bsz=1)
    v2 = v.clone()
    v2[:, :, 0] += 10.0  # change the first token's value
    with torch.no_grad():
        influence = (m(q, k, v2, x)[0] - m(q, k, v, x)[0])[0, :, -1].norm(dim=-1)  # [H] at the last query
        influence_flat = (flat(q, k, v2, x)[0] - flat(q, k, v, x)[0])[0, :, -1].norm(dim=-1)
    assert bool((influence < influence_flat).all())
    assert influence[0] < 0.1 * influence_flat[0]  # head 0: gamma^149 = 0.009
    assert influence[0] < influence[-1]  # slower heads remember more


@pytest.mark.parametrize("name", NAMES)
def test_bf16_inputs(name):
    assert_bf16_inputs_follow_fp32(make_mixer(name), inputs(50), lambda st: state_tensors(st)["S"])
