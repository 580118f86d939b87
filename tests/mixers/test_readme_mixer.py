"""The README's "Add a mixer" walk-through, followed as written: its mixer file is saved as a module of its
own and imported (which registers it), its recipe is saved beside the bench template and loads, and the
registry-wide checks and a conversion of a tiny model run on the new mixer. Then it is unregistered."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from mixer_testing import check_padding_adds_nothing, check_split_and_carry, make_test_mixer
from zoo_testing import tiny_model

import zoo
from zoo.mixers import unregister_mixer

ROOT = Path(__file__).resolve().parents[2]


def walkthrough_blocks() -> dict[str, str]:
    """The fenced code blocks of the README's `## Add a mixer` section, by language."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Add a mixer", 1)[1].split("\n## ", 1)[0]
    return {lang: code for lang, code in re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)}


@pytest.fixture
def readme_mixer(tmp_path):
    code = walkthrough_blocks()["python"]
    path = tmp_path / "relu2.py"  # the README's zoo/mixers/relu2.py, as a module of its own
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("readme_relu2", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    try:
        yield "relu2"
    finally:
        unregister_mixer("relu2")
        sys.modules.pop(spec.name, None)


def test_the_walkthrough_mixer_registers_and_passes_the_registry_checks(readme_mixer):
    assert readme_mixer in zoo.list_mixers()
    cls = zoo.get_mixer(readme_mixer)
    assert cls.family == "linear" and cls.description and cls.test_options == {"feature_dim": 8}
    check_split_and_carry(readme_mixer, cls.test_options)
    check_padding_adds_nothing(readme_mixer, cls.test_options)
    with pytest.raises(ValueError, match="feature_dim"):
        cls.check_options({"feature_dim": 0})
    mixer = make_test_mixer(readme_mixer, cls.test_options)
    assert any(p.requires_grad for p in mixer.parameters())


def test_the_walkthrough_mixer_converts_a_model_and_generates(readme_mixer):
    model = tiny_model("llama")
    zoo.linearize(model, readme_mixer, feature_dim=8)
    ids = torch.randint(3, 100, (1, 12))
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 16)


def test_the_walkthrough_recipe_inherits_the_bench_template(readme_mixer, tmp_path):
    from zoo.recipe import load_recipe

    folder = tmp_path / "smollm2-135m"
    folder.mkdir()
    shutil.copy(ROOT / "recipes" / "smollm2-135m" / "bench.yaml", folder / "bench.yaml")
    (folder / "relu2.yaml").write_text(walkthrough_blocks()["yaml"])
    recipe = load_recipe(folder / "relu2.yaml")
    bench = load_recipe(folder / "bench.yaml")
    assert recipe.mixer.name == "relu2" and recipe.mixer.options == {"feature_dim": 64}
    assert recipe.stage1 == bench.stage1 and recipe.stage2 == bench.stage2 and recipe.data == bench.data
    assert len((folder / "relu2.yaml").read_text().splitlines()) <= 25
