"""zoo.swap_mixers: a trained model's converted layers given another mixer with the same parameters (LoLA's
sparse cache on a lolcats-terraced-sink model), its weights carried over, without training."""

from __future__ import annotations

import pytest
import torch
from zoo_testing import tiny_model

import zoo
from zoo.convert import linearized_layers

OPTIONS = {"window": 4, "feature_dim": 8, "sinks": 2}


def trained_like(seed=0):
    """A tiny llama linearized with lolcats-terraced-sink, its mixer weights moved off their start."""
    model = zoo.linearize(tiny_model("llama", seed=seed), "lolcats-terraced-sink", **OPTIONS)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in linearized_layers(model):
            for p in layer.mixer.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_an_empty_cache_gives_the_same_model_and_a_large_one_changes_it(tmp_path):
    model, ids = trained_like(), torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    before = logits(model, ids)
    zoo.swap_mixers(model, "lola", cache_size=0)
    assert all(layer.mixer.name == "lola" for layer in linearized_layers(model))
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=1e-5)
    zoo.swap_mixers(model, "lola", cache_size=40)  # every older key exact: the layers are softmax attention
    after = logits(model, ids)
    assert not torch.allclose(after, before, atol=1e-3)
    assert model.config.zoo_mixers[0] == {"mixer": "lola", "options": {**OPTIONS, "cache_size": 40}}
    zoo.save_linearized(model, None, tmp_path / "saved")
    loaded, _ = zoo.load_linearized(tmp_path / "saved")
    torch.testing.assert_close(logits(loaded, ids), after)


def test_a_mixer_of_other_parameters_or_options_is_refused_and_nothing_changes():
    window_only = zoo.linearize(tiny_model("llama"), "sliding-window", window=4, sinks=2)
    with pytest.raises(ValueError, match=r"'sliding-window' weights do not fit 'lola' \(missing \["):
        zoo.swap_mixers(window_only, "lola")
    assert window_only.config.zoo_mixers[0]["mixer"] == "sliding-window"
    model = trained_like()
    with pytest.raises(ValueError, match=r"'hedgehog' got unknown option\(s\) \['sinks', 'window'\]"):
        zoo.swap_mixers(model, "hedgehog")
    with pytest.raises(ValueError, match=r"got unknown option\(s\) \['cache'\]"):
        zoo.swap_mixers(model, "lola", cache=3)
    assert all(layer.mixer.name == "lolcats-terraced-sink" for layer in linearized_layers(model))
    assert model.config.zoo_mixers[0]["mixer"] == "lolcats-terraced-sink"


def test_a_model_without_converted_layers_is_refused():
    with pytest.raises(ValueError, match="no converted layer"):
        zoo.swap_mixers(tiny_model("llama"), "lola")
