"""The `lolcats` and `lolcats-terraced` mixers (and their 4-sink variants): carry, padding, GQA, gradients,
decoding, ablations."""

from __future__ import annotations

import pytest
import torch
from mixer_testing import (
    HIDDEN,
    HKV,
    D,
    H,
    assert_bf16_inputs_follow_fp32,
    check_padding_adds_nothing,
    check_split_and_carry,
    inputs,
    run_pieces,
    sl,
)

from zoo.mixers import build_mixer, get_mixer, list_mixers
from zoo.mixers.features import hedgehog_features
from zoo.mixers.lolcats import HedgehogSink, Lolcats, LolcatsSink, LolcatsTerraced, LolcatsTerracedSink

NAMES = ["lolcats", "lolcats-terraced", "lolcats-sink", "lolcats-terraced-sink"]
STATE_FIELDS = ("k", "v", "fk", "S", "z", "n", "sink_k", "sink_v")


def terraced(name):
    return "terraced" in name


def sinks(name):
    return 4 if name.endswith("-sink") else 0


def make_mixer(name, seed=0, num_kv_heads=HKV, **options):
    torch.manual_seed(seed)
    m = build_mixer(name, H, num_kv_heads, D, HIDDEN, 0, **options)
    with torch.no_grad():  # move away from the symmetric init so the tests see real mixing
        for p in (m.feature_map_q.weight, m.feature_map_k.weight):
            p.add_(0.3 * torch.randn_like(p))
        m.window_logit.add_(0.5 * torch.randn_like(m.window_logit))
    return m


def assert_state_close(s1, s2, atol=1e-5):
    assert torch.equal(s1.n, s2.n) and s1.sinks == s2.sinks
    for name in ("k", "v", "fk", "S", "z") + (("sink_k", "sink_v") if s1.sinks else ()):
        torch.testing.assert_close(
            getattr(s1, name),
            getattr(s2, name),
            atol=atol,
            rtol=1e-5,
            msg=lambda m, name=name: f"state.{name}: {m}",
        )


def test_registered():
    assert {"lolcats", "lolcats-terraced"} <= set(list_mixers())
    assert get_mixer("lolcats") is Lolcats and get_mixer("lolcats-terraced") is LolcatsTerraced
    assert (
        get_mixer("lolcats-sink") is LolcatsSink and get_mixer("lolcats-terraced-sink") is LolcatsTerracedSink
    )
    for name in NAMES:
        cls = get_mixer(name)
        assert cls.family == "hybrid" and cls.description and cls.source and "W" in cls.state_size
        assert cls.options == {
            "window": 64,
            "feature_dim": None,
            "window_factor": 0.5,
            "sinks": sinks(name),
            "linear_mass_tokens": None,
            "linear_horizon": None,
        }
        assert cls.terraced == terraced(name) and ("S*Hkv" in cls.state_size) == bool(sinks(name))
    with pytest.raises(ValueError, match="sinks: must be an int >= 0"):
        build_mixer("lolcats", H, HKV, D, HIDDEN, 0, sinks=-1)
    with pytest.raises(ValueError, match="unknown option"):
        build_mixer("lolcats", H, HKV, D, HIDDEN, 0, windw=8)
    m = build_mixer("lolcats-terraced", H, HKV, D, HIDDEN, 0, feature_dim=8)
    assert m.feature_map_q.weight.shape == (H, D, 8) and m.window == 64
    torch.testing.assert_close(torch.sigmoid(m.window_logit), torch.full((H,), 0.5))
    assert {n for n, _ in m.named_parameters()} == {
        "feature_map_q.weight",
        "feature_map_k.weight",
        "window_logit",
    }


@pytest.mark.parametrize("name", NAMES)
def test_split_and_carry(name):
    m = make_mixer(name)
    T = 150
    q, k, v, x = inputs(T)
    with torch.no_grad():
        y_all, s_all = m(q, k, v, x)
        cuts = [0, 1, 65, 149, T]
        y_pieces, st = run_pieces(m, (q, k, v, x), cuts)
    torch.testing.assert_close(y_pieces, y_all, atol=1e-5, rtol=1e-5)
    assert_state_close(st, s_all)


@pytest.mark.parametrize("name", NAMES)
def test_left_padding(name):
    m = make_mixer(name, window=16)
    T, pad = 70, 9
    q, k, v, x = inputs(T)
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
    torch.testing.assert_close(y_pad[0:1, :, pad:], y_ref[0:1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_pad[1:, :, pad - 3 :], y_ref1, atol=1e-5, rtol=1e-5)
    assert torch.all(y_pad[0, :, :pad] == 0)
    for name_ in STATE_FIELDS[: 6 if s_ref.sinks == 0 else 8]:
        torch.testing.assert_close(
            getattr(s_pad, name_)[0:1], getattr(s_ref, name_)[0:1], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(getattr(s_pad, name_)[1:], getattr(s_ref1, name_), atol=1e-5, rtol=1e-5)
    # decoding on from the padded state continues both rows exactly
    q3, k3, v3, x3 = inputs(5, seed=9)
    with torch.no_grad():
        y3, _ = m(q3, k3, v3, x3, state=s_pad)
        y3r, _ = m(q3[:1], k3[:1], v3[:1], x3[:1], state=s_ref.select([0]))
        y3r1, _ = m(q3[1:], k3[1:], v3[1:], x3[1:], state=s_ref1)
    torch.testing.assert_close(y3, torch.cat([y3r, y3r1]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_gqa_equals_repeated_heads(name):
    m = make_mixer(name, window=16)
    full = build_mixer(name, H, H, D, HIDDEN, 0, window=16)
    # the key feature map is per key/value head: each serves its query group
    state = {
        key: t.repeat_interleave(H // HKV, 0) if key.startswith("feature_map_k") else t
        for key, t in m.state_dict().items()
    }
    full.load_state_dict(state)
    q, k, v, x = inputs(40)
    with torch.no_grad():
        y, st = m(q, k, v, x)
        y_full, st_full = full(q, k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1), x)
    assert y.shape == (2, H, 40, D)
    torch.testing.assert_close(y, y_full)
    # the state is kept once per key/value head, as the teacher's KV cache is: a group's heads share it
    assert st.k.shape[1] == st.S.shape[1] == HKV and st_full.k.shape[1] == H
    assert_state_close(st, st_full.group_heads(H // HKV))
    assert st.nbytes() < st_full.nbytes() * 0.6


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_parameters(name):
    m = make_mixer(name, window=16)
    q, k, v, x = inputs(80)
    q.requires_grad_(True)
    y, _ = m(q, k, v, x)
    (y**2).mean().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    assert q.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_decode_one_at_a_time(name):
    m = make_mixer(name, window=16)
    T0, steps = 20, 300
    q, k, v, x = inputs(T0 + steps, Bsz=1)
    limit = 32 if terraced(name) else 16
    with torch.no_grad():
        y_all, s_all = m(q, k, v, x)
        y0, st = m(sl(q, 0, T0), sl(k, 0, T0), sl(v, 0, T0), sl(x, 0, T0))
        ys, prefilled, sizes = [y0], st.nbytes(), set()
        slots = sum(t.numel() * t.element_size() for t in (st.k, st.v, st.fk))
        for t in range(T0, T0 + steps):
            y, st = m(sl(q, t, t + 1), sl(k, t, t + 1), sl(v, t, t + 1), sl(x, t, t + 1), state=st)
            ys.append(y)
            assert st.cached_tokens <= limit
            sizes.add(st.nbytes())
    # constant while decoding; decoding in place adds room for an eighth of the window's slots at most
    assert len(sizes) == 1 and prefilled <= sizes.pop() <= prefilled + slots // 8
    torch.testing.assert_close(torch.cat(ys, 2), y_all, atol=1e-5, rtol=1e-5)
    assert_state_close(st, s_all)


@pytest.mark.parametrize("name", NAMES)
def test_branch_ablations(name):
    m = make_mixer(name, window=8)
    T = 30
    q, k, v, x = inputs(T, Bsz=1)
    kr, vr = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    win = (j // 8 >= i // 8 - 1) & (j <= i) if terraced(name) else (j <= i) & (i - j < 8)
    win = win | (
        (j < sinks(name)) & (j <= i)
    )  # the window branch alone: window + sinks softmax (StreamingLLM)
    with torch.no_grad():
        m.branch = "window"
        y_w, _ = m(q, k, v, x)
        s = (q @ kr.transpose(-1, -2) * D**-0.5).masked_fill(~win, float("-inf"))
        torch.testing.assert_close(y_w, s.softmax(-1) @ vr, atol=1e-5, rtol=1e-5)
        m.branch = "linear"
        y_l, _ = m(q, k, v, x)
        fq = hedgehog_features(m.feature_map_q(q))
        fk = hedgehog_features(m.feature_map_k(k)).repeat_interleave(H // HKV, 1)
        a = (fq @ fk.transpose(-1, -2)).masked_fill(j > i, 0)
        torch.testing.assert_close(y_l, (a / a.sum(-1, keepdim=True)) @ vr, atol=1e-5, rtol=1e-5)
        y_l2, st = m(*(sl(t, 0, 11) for t in (q, k, v, x)))  # carry holds in the ablations too
        y_l3, _ = m(*(sl(t, 11, T) for t in (q, k, v, x)), state=st)
        torch.testing.assert_close(torch.cat([y_l2, y_l3], 2), y_l, atol=1e-5, rtol=1e-5)
        m.branch = "both"
        y_b, _ = m(q, k, v, x)
        wts = m.attention_weights(q, k)
        torch.testing.assert_close(wts @ vr, y_b, atol=1e-5, rtol=1e-5)
        m.branch = "neither"
        with pytest.raises(ValueError, match="branch"):
            m(q, k, v, x)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_inputs(name):
    assert_bf16_inputs_follow_fp32(make_mixer(name, window=16), inputs(50), lambda st: st.S)


def test_hedgehog_sink_has_no_window():
    """`hedgehog-sink`: the 4 sinks are the only softmax keys (max-normalized, weight a), every other key,
    the query's own included, is a Hedgehog linear key (weight b = 1 - a); no window slots in the state."""
    cls = get_mixer("hedgehog-sink")
    assert cls is HedgehogSink and cls.family == "linear" and "window" not in cls.state_size
    assert (cls.options["window"], cls.options["sinks"]) == (0, 4)
    m = make_mixer("hedgehog-sink")
    T = 30
    q, k, v, x = inputs(T, Bsz=1)
    kr, vr = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    sink, lin = (j < 4) & (j <= i), (j >= 4) & (j <= i)
    fq = hedgehog_features(m.feature_map_q(q))
    fk = hedgehog_features(m.feature_map_k(k)).repeat_interleave(H // HKV, 1)
    with torch.no_grad():
        y, st = m(q, k, v, x)
        a = torch.sigmoid(m.window_logit)[:, None, None]
        s = (q @ kr.transpose(-1, -2) * D**-0.5).masked_fill(~sink, float("-inf"))
        w = a * torch.exp(s - s.amax(-1, keepdim=True)) + (1 - a) * (fq @ fk.transpose(-1, -2)) * lin
        torch.testing.assert_close(y, (w / w.sum(-1, keepdim=True)) @ vr, atol=1e-5, rtol=1e-5)
        assert st.cached_tokens == 0 and st.sinks == 4
        m.branch = "window"  # the sinks alone
        torch.testing.assert_close(m(q, k, v, x)[0], s.softmax(-1) @ vr, atol=1e-5, rtol=1e-5)
        m.branch = "linear"  # linear attention over every key
        lw = (fq @ fk.transpose(-1, -2)).masked_fill(j > i, 0)
        torch.testing.assert_close(
            m(q, k, v, x)[0], (lw / lw.sum(-1, keepdim=True)) @ vr, atol=1e-5, rtol=1e-5
        )
    for name, options in (("lolcats", {"window": 0}), ("lolcats-terraced-sink", {"window": 0})):
        with pytest.raises(ValueError, match=r"window >= 1 \(or 0 with sinks >= 1, plain window\)"):
            build_mixer(name, H, HKV, D, HIDDEN, 0, **options)


@pytest.mark.parametrize(
    "limits",
    [{"linear_mass_tokens": 3}, {"linear_horizon": 7}, {"linear_mass_tokens": 3, "linear_horizon": 7}],
    ids=["cap", "horizon", "both"],
)
@pytest.mark.parametrize(
    "name", ["lolcats", "lolcats-terraced-sink", "based-window", "hedgehog-sink", "lola"]
)
def test_the_linear_mass_cap_keeps_split_carry_and_padding_exact(name, limits):
    options = {**get_mixer(name).test_options, **limits}
    check_split_and_carry(name, options)
    check_padding_adds_nothing(name, options)


def test_the_linear_mass_cap_bounds_the_linear_share_and_is_off_within_the_cap():
    torch.manual_seed(0)
    H, D, T, W = 2, 8, 300, 4
    q, k = torch.randn(1, H, T, D), torch.randn(1, H, T, D)
    plain = get_mixer("lolcats")(H, H, D, 16, 0, window=W, feature_dim=8)
    capped = get_mixer("lolcats")(H, H, D, 16, 0, window=W, feature_dim=8, linear_mass_tokens=20)
    capped.load_state_dict(plain.state_dict())
    far = torch.arange(T)[None, :] <= torch.arange(T)[:, None] - W  # the linear keys of each query
    share_plain = (plain.attention_weights(q, k)[0] * far).sum(-1).mean(0)  # [T]
    share_capped = (capped.attention_weights(q, k)[0] * far).sum(-1).mean(0)
    # up to 20 linear keys the cap changes nothing; past it the plain share keeps growing, the capped one not
    torch.testing.assert_close(share_capped[: W + 20], share_plain[: W + 20])
    assert share_plain[-1] > share_plain[W + 40] + 0.02
    assert share_capped[-50:].max() < share_plain[W + 20] + 0.05 and share_capped[-1] < share_plain[-1] - 0.05
    assert capped.linear_keys(torch.tensor([[0, 3, 4, 10]])).tolist() == [[0, 0, 1, 7]]


def test_the_linear_horizon_changes_nothing_within_it_and_shrinks_the_linear_share_past_it():
    torch.manual_seed(0)
    H, D, T, W = 2, 8, 300, 4
    q, k = torch.randn(1, H, T, D), torch.randn(1, H, T, D)
    capped = get_mixer("lolcats")(H, H, D, 16, 0, window=W, feature_dim=8, linear_mass_tokens=20)
    both = get_mixer("lolcats")(
        H, H, D, 16, 0, window=W, feature_dim=8, linear_mass_tokens=20, linear_horizon=60
    )
    both.load_state_dict(capped.state_dict())
    n = torch.tensor([[0, 10, 20, 40, 60, 120, 240]])
    expected = [1, 1, 1, 0.5, 1 / 3, (20 / 120) * (60 / 120), (20 / 240) * (60 / 240)]
    torch.testing.assert_close(both.linear_mass_scale(n)[0], torch.tensor(expected))
    assert both.linear_mass_scale(240) == pytest.approx(expected[-1])
    far = torch.arange(T)[None, :] <= torch.arange(T)[:, None] - W  # the linear keys of each query
    share_capped = (capped.attention_weights(q, k)[0] * far).sum(-1).mean(0)  # [T]
    share_both = (both.attention_weights(q, k)[0] * far).sum(-1).mean(0)
    # up to 60 linear keys the horizon changes nothing; past it the linear share falls below the cap's
    torch.testing.assert_close(share_both[: W + 60], share_capped[: W + 60])
    assert (share_both[W + 80 :] < share_capped[W + 80 :]).all()
    assert share_both[-20:].mean() < 0.5 * share_both[W + 50 : W + 60].mean()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("branch", ["both", "window", "linear"])
@pytest.mark.parametrize(
    "rows,kv_heads,threads", [(2, 2, 1), (3, 1, 2)], ids=["even-units", "3-units-2-threads"]
)  # odd units on 2 threads: a query head an item
def test_decoding_in_one_c_call_is_the_general_path(name, branch, rows, kv_heads, threads):
    """Decoding (rows at one position, no gradient), features and step as one C call (it runs: counted),
    with the linear mass cap and horizon on: the outputs and states of the general path (the C kernels
    off), token after token from a prefill shorter than the window through several window edges."""
    from zoo.kernels import native

    if native.library("window_decode") is None:
        pytest.skip(f"no C kernel: {native.unavailable_reason('window_decode')}")
    m = make_mixer(name, num_kv_heads=kv_heads, window=4, linear_mass_tokens=3, linear_horizon=8)
    m.branch = branch
    T0, steps = 3, 21
    q, k, v, x = inputs(T0 + steps, Bsz=2, hkv=kv_heads)
    q, k, v, x = (t[:1].expand(rows, *t.shape[1:]).contiguous() for t in (q, k, v, x))  # one position
    calls = []  # whether the one-call step ran (it also runs, then, on a state a step already extended)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            _, fused = m(*(sl(t, 0, T0) for t in (q, k, v, x)))
            general, ys, ys0 = fused, [], []
            for t in range(T0, T0 + steps):
                step = [sl(u, t, t + 1) for u in (q, k, v, x)]
                calls.append(m._decode_in_one_call(*step[:3], fused, None) is not None)
                y, fused = m(*step, state=fused)
                with native.disabled():
                    y0, general = m(*step, state=general)
                ys.append(y)
                ys0.append(y0)
    finally:
        torch.set_num_threads(before)
    # every step once the sinks are full (before that, the general step fills them)
    first = max(sinks(name) if branch != "linear" else 0, T0)
    assert calls == [t >= first for t in range(T0, T0 + steps)]
    torch.testing.assert_close(torch.cat(ys, 2), torch.cat(ys0, 2), atol=1e-5, rtol=1e-5)
    assert_state_close(fused, general)


@pytest.mark.parametrize("name", NAMES)
def test_linear_keys_of_one_position_as_a_number_is_linear_keys(name):
    m = make_mixer(name, window=4)
    positions = torch.arange(40)[None]
    for branch in m.BRANCHES:
        m.branch = branch
        assert [m.linear_keys(p) for p in range(40)] == m.linear_keys(positions)[0].tolist()


@pytest.mark.parametrize("relative", ["absolute", "relative"])
@pytest.mark.parametrize(
    "rows,kv_heads,threads",
    [(2, 2, 1), (1, 1, 2), (3, 1, 2)],
    ids=["even-units", "one-unit", "3-units-2-threads"],  # odd units: a query head an item
)
def test_lola_decodes_in_one_c_call_as_the_general_path(relative, rows, kv_heads, threads):
    """`lola` decoding with its cache (rows at one position, the linear mass cap and horizon on): features
    and step as one C call on every token past the sinks (checked; the eviction follows at a block end),
    the general path's outputs and states, through block ends and evictions."""
    from zoo.kernels import native

    if native.library("sparse_decode") is None:
        pytest.skip(f"no C kernel: {native.unavailable_reason('sparse_decode')}")
    m = make_mixer(
        "lola",
        num_kv_heads=kv_heads,
        window=4,
        sinks=2,
        cache_size=3,
        linear_mass_tokens=3,
        linear_horizon=6,
        recall_error=relative,
    )
    T0, steps = 3, 25
    made = inputs(T0 + steps, Bsz=2, hkv=kv_heads)
    q, k, v, x = (t[:1].expand(rows, *t.shape[1:]).contiguous() for t in made)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ys, ys0, ran, fused, general = _lola_token_after_token(m, q, k, v, x, T0, steps)
    finally:
        torch.set_num_threads(before)
    assert ran == [t >= 2 for t in range(T0, T0 + steps)]
    torch.testing.assert_close(torch.cat(ys, 2), torch.cat(ys0, 2), atol=1e-5, rtol=1e-5)
    for got, want in zip(fused.tensors(), general.tensors()):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    positions = torch.arange(60)[None]
    for branch in m.BRANCHES:
        m.branch = branch
        assert [m.linear_keys(p) for p in range(60)] == m.linear_keys(positions)[0].tolist()


def _lola_token_after_token(m, q, k, v, x, T0, steps):
    """A prefill of T0 tokens, then `steps` tokens one at a time, with the C kernels and without: (the
    outputs with, without, whether each step ran in C, the last states with and without)."""
    from zoo.kernels import native

    with torch.no_grad():
        _, fused = m(*(sl(t, 0, T0) for t in (q, k, v, x)))
        general, ys, ys0, ran = fused, [], [], []
        for t in range(T0, T0 + steps):
            step = [sl(u, t, t + 1) for u in (q, k, v, x)]
            y, fused = m(*step, state=fused)
            ran.append(fused.position is not None)
            with native.disabled():
                y0, general = m(*step, state=general)
            ys.append(y)
            ys0.append(y0)
    return ys, ys0, ran, fused, general
