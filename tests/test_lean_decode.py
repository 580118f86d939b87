"""The converted model's lean decoding step (zoo.lean_decode) against transformers' forward (its `off()`):
logits and states over many steps for every registered mixer and every family, left padding through
`generate`, the biases and activations the step handles, and every condition under which it must step
aside."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

import zoo
from tests.zoo_testing import FAMILIES, tiny_model
from zoo import lean_decode
from zoo.cache import CACHE_ARG, MixerStateLayer, ZooCache, map_state
from zoo.lean_decode import decode_step


def converted(mixer="lolcats-sink", family="llama", layers=None, **overrides):
    model = zoo.linearize(
        tiny_model(family, **overrides), mixer, layers=layers, **zoo.get_mixer(mixer).test_options
    )
    with torch.no_grad():  # the mixers' own parameters off their initial values, so each one counts
        g = torch.Generator().manual_seed(5)
        for p in zoo.convert.mixer_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def prefill(model, ids, mask=None):
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    return getattr(out, CACHE_ARG), out.logits[:, -1:].argmax(-1)


def state_tensors(cache: ZooCache) -> list[torch.Tensor]:
    """Every tensor the cache holds: mixer states, and the keys and values of kept softmax layers."""
    found = []
    for layer in cache.layers:
        state = layer.state if isinstance(layer, MixerStateLayer) else (layer.keys, layer.values)
        map_state(lambda t: found.append(t) or t, state)
    return found


def close(a, b, tol=2e-5):
    assert a.shape == b.shape
    if b.numel() == 0:
        return
    scale = max(b.abs().max().item(), 1.0)
    assert (a - b).abs().max().item() <= tol * scale


def decode_both(model, ids, steps, mask=None):
    """`steps` tokens decoded by the lean step and by transformers' forward from the same prefill; each
    step's logits compared, then every state tensor."""
    with torch.no_grad():
        lean_cache, token = prefill(model, ids, mask)
        slow_cache, _ = prefill(model, ids, mask)
        for _ in range(steps):
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            lean = decode_step(model, token, lean_cache, attention_mask=mask)
            assert lean is not None
            with lean_decode.off():
                slow = model(input_ids=token, attention_mask=mask, use_cache=True, **{CACHE_ARG: slow_cache})
            assert getattr(lean, CACHE_ARG) is lean_cache
            close(lean.logits, slow.logits)
            token = slow.logits[:, -1:].argmax(-1)
    lean_states, slow_states = state_tensors(lean_cache), state_tensors(slow_cache)
    assert len(lean_states) == len(slow_states) > 0
    for a, b in zip(lean_states, slow_states):
        close(a.float(), b.float())
    lengths = [layer.get_seq_length() for layer in lean_cache.layers]
    assert (
        lengths
        == [layer.get_seq_length() for layer in slow_cache.layers]
        == [ids.shape[1] + steps] * len(lengths)
    )


@pytest.mark.parametrize("mixer", zoo.list_mixers())
def test_every_mixer_decodes_as_transformers_forward(mixer):
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    decode_both(converted(mixer), ids, steps=13)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_decodes_as_transformers_forward(family):
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    decode_both(converted("lola", family), ids, steps=9)


def test_biases_and_another_activation():
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    model = converted("hedgehog", attention_bias=True, mlp_bias=True, hidden_act="gelu")
    with torch.no_grad():  # transformers starts biases at 0
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    assert model.model.layers[0].self_attn.o_proj.bias.abs().sum() > 0
    assert model.model.layers[0].mlp.down_proj.bias.abs().sum() > 0
    decode_both(model, ids, steps=5)


def test_left_padded_rows_decode_as_transformers_forward():
    ids = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    decode_both(converted("lola"), ids, steps=7, mask=mask)


@pytest.mark.parametrize("family,kept", [("llama", 0), ("qwen3", 1), ("mistral", 1)])
def test_kept_softmax_layers_decode_as_transformers_forward(family, kept):
    overrides = {"sliding_window": None} if family == "mistral" else {}  # see the next test
    model = converted("lola", family, layers=[1 - kept], **overrides)
    assert not hasattr(model.model.layers[kept].self_attn, "mixing")
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(9))
    decode_both(model, ids, steps=8)


def test_kept_softmax_layers_step_aside_for_padding_and_sliding_windows():
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(10))
    padded = torch.ones_like(ids)
    padded[0, 0] = 0
    with torch.no_grad():
        model = converted("lola", layers=[1])
        cache, token = prefill(model, ids, padded)
        mask = torch.cat([padded, padded.new_ones(2, 1)], 1)
        assert decode_step(model, token, cache, attention_mask=mask) is None  # the kept layer needs the mask
        assert decode_step(model, token, cache, attention_mask=torch.ones_like(mask)) is not None
        windowed = converted("lola", "mistral", layers=[1], sliding_window=4)
        cache, token = prefill(windowed, ids)
        assert decode_step(windowed, token, cache) is None  # the window is in transformers' mask
        all_converted = converted("lola", "mistral", sliding_window=4)  # no softmax layer: no mask needed
        cache, token = prefill(all_converted, ids)
        assert decode_step(all_converted, token, cache) is not None


def test_generate_takes_the_lean_step_and_gives_transformers_tokens():
    model = converted("lolcats-sink")
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, output_logits=True)
    with mock.patch.object(lean_decode, "_layer_step", wraps=lean_decode._layer_step) as stepped:
        lean = model.generate(ids, return_dict_in_generate=True, **kwargs)
    assert stepped.call_count == 9 * 2  # every token after the first (the prefill's), each layer
    with lean_decode.off():
        slow = model.generate(ids, return_dict_in_generate=True, **kwargs)
    assert torch.equal(lean.sequences, slow.sequences)
    for a, b in zip(lean.logits, slow.logits):
        close(a, b)


def test_it_steps_aside_where_it_would_not_be_transformers_forward():
    model = converted("lola")
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache, token = prefill(model, ids)
        assert decode_step(model, token, cache) is not None  # the conditions met
        assert decode_step(model, ids, cache) is None  # more than one token
        assert decode_step(model, token, None) is None  # no ZooCache
        assert decode_step(model, token, cache, output_hidden_states=True) is None
        assert decode_step(model, token, cache, return_dict=False) is None
        assert decode_step(model, token, cache, unknown_keyword=1) is None
        padded = torch.ones(1, 7, dtype=torch.long)
        padded[0, -1] = 0
        assert decode_step(model, token, cache, attention_mask=padded) is None  # the current token padding
        with lean_decode.off():
            assert decode_step(model, token, cache) is None
        model.train()
        assert decode_step(model, token, cache) is None
        model.eval()
    assert decode_step(model, token, cache) is None  # gradients on


@pytest.mark.parametrize(
    "change",
    [
        "hook",
        "pre_hook",
        "forward",
        "linear_subclass",
        "norm_class",
        "attention_class",
        "bf16",
        "teacher_mode",
    ],
)
def test_it_steps_aside_for_models_it_does_not_know(change):
    model = converted("lola", layers=[0] if change == "attention_class" else None)
    layer = model.model.layers[1]
    seen = []
    if change == "hook":
        layer.mlp.register_forward_hook(lambda *args: seen.append(1))
    elif change == "pre_hook":
        layer.input_layernorm.register_forward_pre_hook(lambda *args: seen.append(1))
    elif change == "forward":
        real = layer.mlp.forward
        layer.mlp.forward = lambda x: seen.append(1) or real(x)
    elif change == "linear_subclass":

        class Wrapped(nn.Linear):
            pass

        proj = layer.self_attn.q_proj
        wrapped = Wrapped(proj.in_features, proj.out_features, bias=False)
        wrapped.load_state_dict(proj.state_dict())
        layer.self_attn.q_proj = wrapped
    elif change == "norm_class":

        class ScaledNorm(nn.Module):  # not a norm the step knows: its forward is not repeated there
            def __init__(self, norm):
                super().__init__()
                self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon

            def forward(self, x):
                return x * self.weight

        layer.post_attention_layernorm = ScaledNorm(layer.post_attention_layernorm)
    elif change == "attention_class":  # a kept attention of a class the step does not know

        class OtherAttention(type(layer.self_attn)):
            pass

        layer.self_attn.__class__ = OtherAttention
    elif change == "bf16":
        model = model.to(torch.bfloat16)
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cache, token = prefill(model, ids)
        if change == "teacher_mode":
            with zoo.convert.softmax_teacher(model):
                assert decode_step(model, token, cache) is None
            return
        assert decode_step(model, token, cache) is None
        seen.clear()
        model(input_ids=token, use_cache=True, **{CACHE_ARG: cache})  # transformers' forward, hooks and all
    if change in ("hook", "pre_hook", "forward"):
        assert seen == [1]


def test_the_environment_turns_it_off(monkeypatch):
    model = converted("hedgehog")
    ids = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        cache, token = prefill(model, ids)
        monkeypatch.setenv(lean_decode.ENV_VAR, "off")
        assert decode_step(model, token, cache) is None
        monkeypatch.setenv(lean_decode.ENV_VAR, "sometimes")
        with pytest.raises(
            ValueError, match="ZOO_LEAN_DECODE='sometimes' is not a setting; choose on or off"
        ):
            decode_step(model, token, cache)
        monkeypatch.setenv(lean_decode.ENV_VAR, "on")
        assert decode_step(model, token, cache) is not None
