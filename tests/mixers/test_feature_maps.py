"""Feature-map linear attention mixers: linear-elu, t2r, hedgehog."""

import pytest
import torch

from zoo.mixers import build_mixer, get_mixer, repeat_kv

NAMES = ["linear-elu", "t2r", "hedgehog"]
B, H, HKV, D = 2, 4, 2, 16


def make_mixer(name, **options):
    torch.manual_seed(0)
    m = build_mixer(name, H, HKV, D, H * D, layer_idx=0, **options)
    with torch.no_grad():  # move learned maps off their identity start so the tests see generic maps
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def inputs(T, seed=0, batch=B, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, H, T, D, generator=g)
    k = torch.randn(batch, HKV, T, D, generator=g)
    v = torch.randn(batch, HKV, T, D, generator=g)
    x = torch.randn(batch, T, H * D, generator=g)
    return [t.to(dtype) for t in (q, k, v, x)]


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def sliced(ts, a, b):
    q, k, v, x = ts
    return q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], x[:, a:b]


@pytest.mark.parametrize("name", NAMES)
def test_class_attributes_and_options(name):
    cls = get_mixer(name)
    assert cls.family == "linear" and cls.description and cls.source and cls.state_size != "?"
    with pytest.raises(ValueError, match="unknown option"):
        build_mixer(name, H, HKV, D, H * D, 0, no_such_option=1)


@pytest.mark.parametrize("name", NAMES)
def test_gqa_shapes_and_state(name):
    m = make_mixer(name)
    q, k, v, x = inputs(20)
    y, state = m(q, k, v, x)
    F = {"linear-elu": D, "t2r": D, "hedgehog": 2 * D}[name]
    assert y.shape == (B, H, 20, D) and y.dtype == q.dtype
    # a query group shares its keys and values, hence its state: kept once per key/value head
    assert state.S.shape == (B, HKV, F, D) and state.z.shape == (B, HKV, F)
    assert state.S.dtype == torch.float32 and torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("split", [1, 17, 36])
def test_split_and_carry(name, split):
    m = make_mixer(name)
    ts = inputs(37, seed=1)
    y, s = m(*ts)
    y1, s1 = m(*sliced(ts, 0, split))
    y2, s2 = m(*sliced(ts, split, 37), state=s1)
    close(torch.cat([y1, y2], dim=2), y)
    close(s2.S, s.S)
    close(s2.z, s.z)


@pytest.mark.parametrize("name", NAMES)
def test_token_by_token_decoding(name):
    m = make_mixer(name)
    ts = inputs(24, seed=2)
    y, s = m(*ts)
    y_prefix, state = m(*sliced(ts, 0, 20))
    ys = [y_prefix]
    for t in range(20, 24):
        yt, state = m(*sliced(ts, t, t + 1), state=state)
        ys.append(yt)
    close(torch.cat(ys, dim=2), y)
    close(state.S, s.S)


@pytest.mark.parametrize("name", NAMES)
def test_left_padding_adds_nothing(name):
    m = make_mixer(name)
    T, pads = 30, [7, 0]
    ts = inputs(T, seed=3)
    # row b: pads[b] garbage tokens, then its real tokens ts[b, :T - pads[b]]
    padded = [torch.randn_like(t) * 10 for t in ts]
    mask = torch.ones(B, T)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
        for t, pt in zip(ts, padded):
            if t.dim() == 4:
                pt[b, :, p:] = t[b, :, : T - p]
            else:
                pt[b, p:] = t[b, : T - p]
    y, s = m(*padded, mask=mask)
    for b, p in enumerate(pads):
        yb, sb = m(*[t[b : b + 1, ..., : T - p, :] if t.dim() == 4 else t[b : b + 1, : T - p] for t in ts])
        close(y[b : b + 1, :, p:], yb)
        close(s.S[b : b + 1], sb.S)
        close(s.z[b : b + 1], sb.z)
    # decoding on from the padded prefix matches decoding on from the unpadded one
    extra = inputs(3, seed=4)
    y_next, _ = m(*extra, state=s, mask=torch.ones(B, 3))
    y_ref, _ = m(*[t[:1] for t in extra], state=type(s)(s.S[:1], s.z[:1]))
    close(y_next[:1], y_ref)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_the_feature_map(name):
    m = make_mixer(name)
    params = dict(m.named_parameters())
    if name == "linear-elu":
        assert not params
    else:
        assert params and all(p.requires_grad for p in params.values())
    q, k, v, x = inputs(40, seed=5)
    q.requires_grad_(True)
    k.requires_grad_(True)
    y, _ = m(q, k, v, x)
    (y * torch.randn_like(y)).sum().backward()
    for n, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_attention_weights_match_forward(name):
    m = make_mixer(name)
    q, k, v, x = inputs(25, seed=6)
    w = m.attention_weights(q, k)
    assert w.shape == (B, H, 25, 25)
    assert (w >= 0).all()
    assert torch.equal(w.triu(1), torch.zeros_like(w))  # causal
    close(w.sum(-1), torch.ones(B, H, 25), 1e-4)
    y, _ = m(q, k, v, x)
    close(w @ repeat_kv(v, H), y)


@pytest.mark.parametrize("name", ["t2r", "hedgehog"])
def test_tied_maps_and_feature_dim(name):
    m = make_mixer(name, feature_dim=8, tie_qk=True)
    untied = make_mixer(name, feature_dim=8)
    assert sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in untied.parameters())
    F = 16 if name == "hedgehog" else 8
    ts = inputs(37, seed=7)
    y, s = m(*ts)
    assert s.S.shape == (B, HKV, F, D)
    y1, s1 = m(*sliced(ts, 0, 17))
    y2, _ = m(*sliced(ts, 17, 37), state=s1)
    close(torch.cat([y1, y2], dim=2), y)


@pytest.mark.parametrize("name", NAMES)
def test_bf16(name):
    m = make_mixer(name)
    ts = inputs(70, seed=8)
    y32, _ = m(*ts)
    y16, s16 = m.to(torch.bfloat16)(*[t.bfloat16() for t in ts])
    assert y16.dtype == torch.bfloat16 and s16.S.dtype == torch.float32
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05)


def test_start_is_sensible():
    # identity-initialized maps: hedgehog and t2r start as a well-defined, finite linear attention
    for name in ("t2r", "hedgehog"):
        m = build_mixer(name, H, HKV, D, H * D, 0)
        y, _ = m(*inputs(50, seed=9))
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("heads, D, F2", [(3, 64, 64), (2, 5, 7), (1, 16, 3)])
def test_hedgehog_of_one_token_in_c_is_the_pytorch_map(heads, D, F2):
    """One token per row, fp32, no gradients: the C map (it runs: checked) gives the PyTorch ops' features."""
    from zoo.kernels import native
    from zoo.mixers.features import HeadwiseLinear, _hedgehog_one_token, hedgehog_features, hedgehog_of

    if native.library("hedgehog_features") is None:
        pytest.skip(f"no C kernel: {native.unavailable_reason('hedgehog_features')}")
    torch.manual_seed(1)
    linear = HeadwiseLinear(heads, D, F2)
    with torch.no_grad():
        linear.weight.add_(torch.randn_like(linear.weight))
        x = 3 * torch.randn(4, heads, 1, D)
        assert _hedgehog_one_token(linear, x) is not None
        close(hedgehog_of(linear, x), hedgehog_features(linear(x)))
        with native.disabled():
            assert _hedgehog_one_token(linear, x) is None
    # what it leaves to PyTorch: gradients, several tokens, bf16, a bias, maps shared by a group of heads
    assert _hedgehog_one_token(linear, x) is None  # the weight wants its gradient
    with torch.no_grad():
        assert _hedgehog_one_token(linear, torch.randn(4, heads, 2, D)) is None
        assert _hedgehog_one_token(linear, x.bfloat16()) is None
        assert _hedgehog_one_token(HeadwiseLinear(heads, D, F2, bias=True), x) is None
        assert _hedgehog_one_token(linear, x.repeat_interleave(2, 1)) is None
        close(
            hedgehog_of(linear, x.repeat_interleave(2, 1)),
            hedgehog_features(linear(x.repeat_interleave(2, 1))),
        )
