"""Mixer options: every option of every registered mixer declares its kind, range and meaning, and one generic
check refuses a bad value with one line naming it, before the mixer makes any tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import zoo
from zoo.mixers.base import Mixer, build_mixer, get_mixer
from zoo.mixers.options import Option
from zoo.recipe import load_recipe

NAMES = zoo.list_mixers()
SHAPE = (9, 3, 64, 576, 0)  # heads, key/value heads, head dim, hidden size, layer: SmolLM2-135M's
RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*/*.yaml"))
#: values of the wrong kind for each kind of option
WRONG_KIND = {
    int: [2.0, "2", True, [2]],
    float: ["fast", True, [1.0], float("nan")],
    bool: [1, "yes", None],
    str: [3, ["silu"]],
    list: ["x", 0.1],
}


class TensorSpy(TorchFunctionMode):
    """Records every torch function called (factories included) while active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


def refused_before_any_tensor(name, **options) -> str:
    """Build mixer `name` with `options`, expecting a ValueError before any torch call; its message."""
    with TensorSpy() as spy, pytest.raises(ValueError) as err:
        build_mixer(name, *SHAPE, **options)
    assert spy.calls == [], f"{name} {options}: tensors made before the options were checked: {spy.calls[:3]}"
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", NAMES)
def test_every_option_is_declared_with_a_one_line_doc(name):
    cls = get_mixer(name)
    assert set(cls.option_specs) == set(cls.options)
    for key, spec in cls.option_specs.items():
        assert isinstance(spec, Option) and spec.declared, f"{name}.{key}: no declared Option"
        assert spec.doc and "\n" not in spec.doc, f"{name}.{key}"
        assert spec.kind in (int, float, bool, str, list), f"{name}.{key}"
        assert cls.options[key] == spec.default and spec.describe()


@pytest.mark.parametrize("name", NAMES)
def test_defaults_pass_their_own_check_and_build_on_meta(name):
    cls = get_mixer(name)
    for key, spec in cls.option_specs.items():
        assert spec.check(spec.default, key) == spec.default
    assert cls.check_options({}) == cls.options
    assert cls.check_options(dict(cls.options)) == cls.options
    with torch.device("meta"):
        m = build_mixer(name, *SHAPE)
    assert m.config == cls.options
    assert all(p.is_meta for p in m.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_a_value_below_the_minimum_is_refused_before_any_tensor(name):
    specs = get_mixer(name).option_specs
    for key, spec in specs.items():
        if spec.kind not in (int, float) or (spec.min is None and spec.above is None):
            continue
        low = spec.min - (1 if spec.kind is int else 0.5) if spec.min is not None else spec.above
        message = refused_before_any_tensor(name, **{key: low})
        assert f"mixer.options.{key}: must be" in message and spec.describe() in message
        assert message.endswith(f"got {low!r}")


@pytest.mark.parametrize("name", NAMES)
def test_a_value_of_the_wrong_kind_is_refused(name):
    for key, spec in get_mixer(name).option_specs.items():
        for bad in WRONG_KIND[spec.kind]:
            if bad is None and spec.nullable:
                continue
            message = refused_before_any_tensor(name, **{key: bad})
            assert f"mixer.options.{key}:" in message, message


@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_option_is_still_refused(name):
    message = refused_before_any_tensor(name, no_such_option=1)
    assert "unknown option(s) ['no_such_option']" in message and "allowed:" in message


def test_the_spy_sees_the_tensors_a_mixer_makes():
    with TensorSpy() as spy:
        build_mixer("hedgehog", *SHAPE)
    assert spy.calls


def test_the_messages_say_what_was_wrong_and_what_is_allowed():
    message = refused_before_any_tensor("hedgehog", feature_dim=-3)
    assert message == "mixer.options.feature_dim: must be an int >= 1 or null (null: head_dim), got -3"
    message = refused_before_any_tensor("delta", feature_map="tanh")
    assert message == "mixer.options.feature_map: must be one of identity, silu, relu, hedgehog, got 'tanh'"
    message = refused_before_any_tensor("lolcats", window_factor=1)
    assert message == "mixer.options.window_factor: must be a float in (0, 1), got 1"
    message = refused_before_any_tensor("liger", alpha=1.5)
    assert message == "mixer.options.alpha: must be a float in [0, 1], got 1.5"
    message = refused_before_any_tensor("lolcats", window=64.0)
    assert message == "mixer.options.window: must be an int >= 0, got 64.0"


def test_cross_option_rules_stay_one_line_errors_naming_the_options():
    for name, options, words in (
        ("lolcats", {"window": 0}, ("window", "sinks")),
        ("lolcats-terraced-sink", {"window": 0}, ("window", "sinks")),
        ("gated-delta", {"dt_min": 0.2, "dt_max": 0.1}, ("dt_min", "dt_max")),
        ("mamba2", {"dt_min": 0.2, "dt_max": 0.1}, ("dt_min", "dt_max")),
        ("gated-delta-conv", {"decays": [[0.2, 0.1]]}, ("dt_min", "dt_max")),
        ("gated-delta-conv", {"decays": [[0.1]]}, ("decays",)),
        ("gated-delta-conv", {"decays": [[0.1, "fast"]]}, ("decays[0][1]",)),
        ("based", {"feature_dim": 15}, ("feature_dim", "even")),
    ):
        with torch.device("meta"), pytest.raises(ValueError) as err:
            build_mixer(name, *SHAPE, **options)
        assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_checked_values_are_coerced_into_the_config():
    with torch.device("meta"):
        m = build_mixer("gla", *SHAPE, tau=8, gate_bias="1e-1")  # YAML 1.1 reads 1e-1 as a string
    assert m.config["tau"] == 8.0 and isinstance(m.config["tau"], float) and m.config["gate_bias"] == 0.1
    with torch.device("meta"):
        m = build_mixer("gated-delta-conv", *SHAPE, decays=((1e-3, 1e-2),))
    assert m.config["decays"] == [(1e-3, 1e-2)] and m.memories == 1


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_recipes_options_build_on_meta(path):
    recipe = load_recipe(path)
    with torch.device("meta"):
        build_mixer(recipe.mixer.name, *SHAPE, **recipe.mixer_options())


def test_option_describes_its_kind_and_range():
    assert Option(None, int, min=1, nullable=True, doc="F; null: head_dim").describe() == "int >= 1 or null"
    assert Option(0.5, float, above=0, below=1, doc="a").describe() == "float in (0, 1)"
    assert Option(0.5, float, above=0, max=1, doc="a").describe() == "float in (0, 1]"
    assert Option(2.0, float, below=3, doc="a").describe() == "float < 3"
    assert Option(True, bool, doc="a").describe() == "bool"
    choice = Option("a", str, choices=("a", "b"), nullable=True, doc="x; null: a")
    assert choice.describe() == "one of a, b or null"
    assert Option(1, float, doc="a").check(2, "k") == 2.0
    for bad_spec in (
        dict(kind=dict),
        dict(kind=str, min=1),
        dict(kind=int, min=1, above=0),
        dict(doc=""),
        dict(doc="two\nlines"),
        dict(kind=None),
        dict(nullable=True),
    ):
        with pytest.raises(TypeError):
            Option(**{"default": 1, "kind": int, "doc": "a", **bad_spec})


def test_plain_defaults_inherit_the_declared_spec_or_get_an_inferred_one():
    sink = get_mixer("lolcats-sink").option_specs["sinks"]
    assert sink.declared and sink.default == 4 and sink.min == 0
    assert sink.doc == get_mixer("lolcats").option_specs["sinks"].doc

    class Plugin(Mixer):  # not registered: a third-party mixer with plain defaults
        options = {"scale": 1.0, "steps": 3, "extra": None}

    specs = Plugin.option_specs
    assert not any(s.declared for s in specs.values())
    assert Plugin.options == {"scale": 1.0, "steps": 3, "extra": None}
    assert (specs["scale"].kind, specs["steps"].kind, specs["extra"].kind) == (float, int, None)
    assert Plugin.check_options({"scale": 2, "extra": {"any": "thing"}})["scale"] == 2.0
    with pytest.raises(ValueError, match=r"mixer.options.steps: must be an int, got 0.5"):
        Plugin.check_options({"steps": 0.5})
