"""zoo.recipe: schema validation, overrides, layer selection, and the shipped recipe files."""

from pathlib import Path

import pytest
import yaml

from zoo.recipe import Recipe, RecipeError, load_recipe, parse_layers, parse_override

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("**/*.yaml"))
MINIMAL = {"mixer": {"name": "lolcats"}}


def test_recipes_exist():
    names = {f"{p.parent.name}/{p.name}" for p in RECIPES}
    assert {
        "smollm2-135m/lolcats.yaml",
        "smollm2-135m/hedgehog.yaml",
        "llama-3-8b/lolcats.yaml",
        "mistral-7b/lolcats.yaml",
    } <= names


def test_each_smollm2_recipe_is_the_bench_template_plus_at_most_25_lines():
    folder = RECIPES[0].parents[1] / "smollm2-135m"
    for path in sorted(folder.glob("*.yaml")):
        if path.name == "bench.yaml":
            continue
        lines = path.read_text().splitlines()
        assert any(line.startswith("base: bench.yaml") for line in lines), path.name
        assert len(lines) <= 25, f"{path.name}: {len(lines)} lines"


def test_every_built_in_mixer_has_a_smollm2_recipe_naming_it():
    import zoo
    from zoo.bench.quality import own_recipe

    built_in = {
        name for name in zoo.list_mixers() if zoo.get_mixer(name).__module__.startswith("zoo.mixers.")
    }
    folder = RECIPES[0].parents[1] / "smollm2-135m"
    for name in built_in:
        own = own_recipe(name, folder)
        assert own is not None and load_recipe(own).mixer.name == name, name


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_file_loads_and_names_its_launch_command(path):
    recipe = load_recipe(path)
    first = path.read_text().splitlines()[0]
    relative = path.relative_to(path.parents[2]).as_posix()
    # `zoo run RECIPE`, for multi-GPU recipes the torchrun command that runs it on every rank, for the
    # bench's template the bench
    assert (
        first == f"# zoo run {relative}"
        or (first.startswith("# torchrun ") and first.endswith(f" -m zoo.cli run {relative}"))
        or (path.name == "bench.yaml" and first.startswith("# zoo bench quality"))
    )
    # it round-trips through its resolved form
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe


def test_paper_recipes_follow_the_paper():
    for name, hub in [
        ("llama-3-8b", "meta-llama/Meta-Llama-3-8B"),
        ("mistral-7b", "mistralai/Mistral-7B-v0.1"),
    ]:
        r = load_recipe(Path(RECIPES[0]).parents[1] / name / "lolcats.yaml")
        assert r.model.name == hub and r.model.dtype == "bfloat16"
        assert r.mixer.name == "lolcats" and r.mixer.options == {"window": 64, "feature_dim": 64}
        assert r.stage1.tokens == r.stage2.tokens == 20_000_000 and r.data.seq_len == 1024
        assert r.stage1.lr == 1e-2 and r.stage2.lr == 1e-4
        lora = r.stage2.lora
        assert (lora.rank, lora.alpha, lora.dropout) == (8, 16, 0.0)
        assert lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
        assert r.data.train == ["hf:yahma/alpaca-cleaned"]


def test_defaults():
    r = Recipe.from_dict(MINIMAL)
    assert r.model.name == "smollm2-135m" and r.model.dtype == "auto"
    assert r.mixer.options == {} and r.mixer.layers is None
    assert r.data.train == ["austen", "bible"] and r.data.eval_ood == ["brown"]
    assert r.stage1.tokens == 200_000 and r.stage1.lr == 1e-2
    assert r.stage2.lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert r.eval.mmlu == 0 and r.seed == 0 and r.device == "auto"
    # defaults are not shared between instances
    r.data.train.append("x")
    assert Recipe.from_dict(MINIMAL).data.train == ["austen", "bible"]


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(RecipeError) as err:
        Recipe.from_dict({**MINIMAL, "stage1": {"lrr": 0.1}})
    message = str(err.value)
    assert "stage1.lrr" in message
    for allowed in ("enabled", "tokens", "batch_size", "lr", "weight_decay", "attention_ce"):
        assert allowed in message
    assert err.value.key == "stage1.lrr" and "lr" in err.value.allowed
    with pytest.raises(RecipeError, match="'stage2.lora.rnk'.*rank, alpha, dropout, targets"):
        Recipe.from_dict({**MINIMAL, "stage2": {"lora": {"rnk": 4}}})
    with pytest.raises(RecipeError, match="unknown key 'stage3'.*model, mixer, data"):
        Recipe.from_dict({**MINIMAL, "stage3": {}})


def test_wrong_types():
    cases = [
        ({"stage1": {"lr": "fast"}}, "stage1.lr: expected float, got str 'fast'"),
        ({"stage1": {"batch_size": 2.5}}, "stage1.batch_size: expected int"),
        ({"stage1": {"tokens": True}}, "stage1.tokens: expected int, got bool"),  # bools are not ints
        ({"stage1": {"enabled": 1}}, "stage1.enabled: expected bool"),
        ({"data": {"train": "austen"}}, "data.train: expected list of string"),
        ({"data": {"train": ["austen", 3]}}, r"data.train\[1\]: expected string"),
        ({"stage2": 5}, "stage2: expected a mapping"),
        ({"mixer": {"name": "x", "options": [1]}}, "mixer.options: expected mapping"),
        ({"mixer": {"name": "x", "layers": 90}}, "mixer.layers: expected list of int or string or null"),
        ({"model": {"name": 7}}, "model.name: expected string"),
    ]
    for patch, pattern in cases:
        d = {**MINIMAL, **patch}
        with pytest.raises(RecipeError, match=pattern):
            Recipe.from_dict(d)


def test_numbers_are_coerced():
    r = Recipe.from_dict(
        {
            **MINIMAL,
            "stage1": {"lr": 1, "tokens": "2e5"},
            "stage2": {"lr": "1e-3"},
            "data": {"heldout_fraction": "5e-2"},
        }
    )
    assert r.stage1.lr == 1.0 and isinstance(r.stage1.lr, float)
    assert r.stage1.tokens == 200_000 and isinstance(r.stage1.tokens, int)
    assert r.stage2.lr == pytest.approx(1e-3)
    assert r.data.heldout_fraction == pytest.approx(0.05)


def test_value_checks():
    cases = [
        ({"stage1": {"tokens": -1}}, "stage1.tokens: must be >= 0"),
        ({"stage2": {"batch_size": 0}}, "stage2.batch_size: must be >= 1"),
        ({"data": {"seq_len": 1}}, "data.seq_len: must be >= 2"),
        ({"data": {"heldout_fraction": 0}}, "data.heldout_fraction"),
        ({"data": {"heldout_fraction": 1.0}}, "data.heldout_fraction"),
        ({"model": {"dtype": "int8"}}, "model.dtype: must be one of auto, float32, bfloat16, float16"),
        ({"device": "tpu"}, "device: must be one of auto, cpu, cuda"),
        ({"mixer": {"name": "x", "layers": "a:b"}}, "mixer.layers"),
        ({"stage2": {"lora": {"rank": 0}}}, "stage2.lora.rank"),
        ({"stage2": {"distill": -0.5}}, "stage2.distill: must be >= 0"),
        ({"stage2": {"distill_from": "oracle"}}, "stage2.distill_from: must be one of teacher, reference"),
        ({"stage1": {"adam_betas": [0.9]}}, r"stage1.adam_betas: must be two numbers in \[0, 1\)"),
        ({"stage2": {"adam_betas": [0.9, 1.0]}}, r"stage2.adam_betas: must be two numbers in \[0, 1\)"),
    ]
    for patch, pattern in cases:
        with pytest.raises(RecipeError, match=pattern):
            Recipe.from_dict({**MINIMAL, **patch})
    with pytest.raises(RecipeError, match="missing required key 'mixer.name'"):
        Recipe.from_dict({"mixer": {"options": {}}})
    assert Recipe.from_dict({**MINIMAL, "stage1": {"tokens": 0}}).stage1.tokens == 0


def test_overrides():
    r = Recipe.from_dict(
        MINIMAL,
        [
            "stage1.lr=1e-3",
            "mixer.layers=[0,1]",
            "mixer.options.window=32",
            "stage2.lora.rank=4",
            "eval.generate_prompt=Hello there",
            "stage2.enabled=false",
            "data.train=[austen]",
        ],
    )
    assert r.stage1.lr == pytest.approx(1e-3) and isinstance(r.stage1.lr, float)
    assert r.mixer.layers == [0, 1]
    assert r.mixer.options == {"window": 32}
    assert r.stage2.lora.rank == 4 and r.stage2.lora.alpha == 16
    assert r.eval.generate_prompt == "Hello there"
    assert r.stage2.enabled is False
    assert r.data.train == ["austen"]


def test_overrides_keep_file_values_and_merge_sections():
    base = {
        "mixer": {"name": "lolcats", "options": {"window": 64, "feature_dim": 64}},
        "stage2": {"lora": {"rank": 16, "alpha": 32}},
    }
    r = Recipe.from_dict(base, ["mixer.options.window=32", "stage2.lora={rank: 4}"])
    assert r.mixer.options == {"window": 32, "feature_dim": 64}
    assert (r.stage2.lora.rank, r.stage2.lora.alpha) == (4, 32)
    assert base["mixer"]["options"]["window"] == 64  # the input is not modified
    # Recipe.override and load_recipe(..., overrides)
    assert r.override(["seed=3"]).seed == 3


def test_override_slices_stay_strings():
    for spec in ("0:10", "1:30", "-4:", "::2", "2:20:3"):
        path, value = parse_override(f"mixer.layers={spec}")
        assert path == ["mixer", "layers"] and value == spec
        assert Recipe.from_dict(MINIMAL, [f"mixer.layers={spec}"]).mixer.layers == spec
    assert Recipe.from_dict(MINIMAL, ["mixer.layers=null"]).mixer.layers is None
    assert Recipe.from_dict(MINIMAL, ["model.name=123"]).model.name == "123"


def test_unknown_override_key():
    with pytest.raises(RecipeError) as err:
        Recipe.from_dict(MINIMAL, ["stage1.learning_rate=1e-3"])
    assert "stage1.learning_rate" in str(err.value) and "lr" in err.value.allowed
    assert "allowed keys under 'stage1'" in str(err.value)
    with pytest.raises(RecipeError, match="unknown key 'optimizer'"):
        Recipe.from_dict(MINIMAL, ["optimizer.lr=1"])
    with pytest.raises(RecipeError, match="'seed' is a value"):
        Recipe.from_dict(MINIMAL, ["seed.x=1"])
    with pytest.raises(RecipeError, match="key.sub=value"):
        Recipe.from_dict(MINIMAL, ["stage1.lr"])
    with pytest.raises(RecipeError, match="stage1.lr: expected float"):
        Recipe.from_dict(MINIMAL, ["stage1.lr=fast"])


def test_load_recipe_with_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("# zoo run r.yaml\nmixer:\n  name: hedgehog\nstage1:\n  lr: 1e-2\n  tokens: 1000\n")
    r = load_recipe(path, ["stage1.tokens=500"])
    assert r.mixer.name == "hedgehog" and r.stage1.lr == pytest.approx(1e-2) and r.stage1.tokens == 500
    path.write_text("mixer:\n  name: hedgehog\n  layerz: [1]\n")
    with pytest.raises(RecipeError, match=r"r.yaml: unknown key 'mixer.layerz'.*name, options, layers"):
        load_recipe(path)


def test_parse_layers():
    assert parse_layers(None, 4) == [0, 1, 2, 3]
    assert parse_layers([2, 0], 4) == [0, 2]
    assert parse_layers([-1], 4) == [3]
    assert parse_layers("0:2", 4) == [0, 1]
    assert parse_layers("::2", 5) == [0, 2, 4]
    assert parse_layers("-2:", 30) == [28, 29]
    assert parse_layers("1:30:10", 30) == [1, 11, 21]
    assert parse_layers(" 3 : ", 4) == [3]
    for bad in ([4], [-5], "0:5", "4:", "a:b", "1", "::0", "3:1", [0, 0]):
        with pytest.raises(ValueError):
            parse_layers(bad, 4)
    r = Recipe.from_dict({"mixer": {"name": "x", "layers": "10:20"}})
    assert r.mixer.layer_indices(30) == list(range(10, 20))


def test_to_dict_round_trip():
    d = {
        "model": {"name": "some/model", "dtype": "bfloat16"},
        "mixer": {"name": "lolcats", "options": {"window": 32, "nested": {"a": [1, 2]}}, "layers": "0:8"},
        "stage1": {"lr": "3e-3", "enabled": False},
        "stage2": {"lora": {"targets": ["q_proj"]}},
        "eval": {"mmlu": 57},
        "seed": 7,
        "device": "cpu",
    }
    r = Recipe.from_dict(d)
    out = r.to_dict()
    assert out["stage1"]["lr"] == pytest.approx(3e-3) and out["mixer"]["options"]["nested"] == {"a": [1, 2]}
    assert Recipe.from_dict(out) == r
    assert Recipe.from_dict(yaml.safe_load(r.to_yaml())) == r
    assert Recipe.from_dict(out).to_dict() == out


def test_base_inherits_sections_key_by_key_and_the_mixer_whole(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "mixer: {name: lolcats, options: {window: 32}}\nstage1: {lr: 0.5, tokens: 100}\nseed: 3\n"
    )
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmixer: {name: hedgehog}\nstage1: {tokens: 200}\n")
    recipe = load_recipe(tmp_path / "child.yaml")
    assert recipe.mixer.name == "hedgehog" and recipe.mixer.options == {}  # no lolcats window inherited
    assert recipe.stage1.tokens == 200 and recipe.stage1.lr == 0.5 and recipe.seed == 3
    (tmp_path / "grandchild.yaml").write_text("base: child.yaml\nseed: 4\n")
    assert load_recipe(tmp_path / "grandchild.yaml").stage1.tokens == 200


def test_a_bad_base_is_a_clear_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nmixer: {name: hedgehog}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(RecipeError, match="inherits from itself"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\nmixer: {name: hedgehog}\n")
    with pytest.raises(RecipeError, match="no recipe at"):
        load_recipe(tmp_path / "c.yaml")


def test_a_mixer_option_given_as_seq_len_is_the_training_length_where_the_mixer_is_built():
    from zoo.preflight import check_mixer, model_facts

    raw = {
        "mixer": {"name": "lolcats-sink", "options": {"linear_mass_tokens": 64, "linear_horizon": "seq_len"}}
    }
    recipe = Recipe.from_dict(raw)
    assert recipe.mixer_options() == {"linear_mass_tokens": 64, "linear_horizon": 256}
    # it follows the training length that overrides set, the longest stage's where a stage sets its own
    assert recipe.override(["data.seq_len=1024"]).mixer_options()["linear_horizon"] == 1024
    assert recipe.override(["stage2.seq_len=2048"]).mixer_options()["linear_horizon"] == 2048
    assert (
        recipe.training_length() == 256 and recipe.override(["stage1.seq_len=512"]).training_length() == 512
    )
    # the recipe itself keeps the word, so a run folder's recipe.yaml says what the length was tied to
    assert yaml.safe_load(recipe.to_yaml())["mixer"]["options"]["linear_horizon"] == "seq_len"
    facts = model_facts("smollm2-135m")
    assert check_mixer(recipe, facts) == list(range(facts.num_layers))
    # a mixer without the option refuses it by name, as any unknown option
    other = Recipe.from_dict({"mixer": {"name": "hedgehog", "options": {"linear_horizon": "seq_len"}}})
    with pytest.raises(RecipeError, match="unknown option"):
        check_mixer(other, facts)
