"""Layer selection: one layer given back its softmax at a time, the planted bad layer chosen, the command."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from zoo_testing import RECIPE, tiny_model, tiny_overrides

import zoo
from zoo.cli import main
from zoo.convert import softmax_teacher
from zoo.layer_select import choose_layers, evenly_spaced, layer_scores, linearized_complement


def test_one_layer_given_back_is_the_model_linearized_without_it():
    teacher = tiny_model("llama", num_hidden_layers=4).eval()
    model = zoo.linearize(copy.deepcopy(teacher), "hedgehog")
    without = zoo.linearize(copy.deepcopy(teacher), "hedgehog", layers=[0, 2, 3])
    without.load_state_dict(model.state_dict(), strict=False)  # the same mixers in layers 0, 2 and 3
    ids = torch.randint(3, 128, (2, 21))
    with torch.no_grad(), softmax_teacher(model, [1]):
        given_back = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(given_back, without(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"layer\(s\) \[7\] are not converted"):
        with softmax_teacher(model, [7]):
            pass


def test_the_planted_bad_layer_is_chosen():
    teacher = tiny_model("llama", num_hidden_layers=4).eval()
    model = zoo.linearize(copy.deepcopy(teacher), "hedgehog")
    planted = zoo.convert.linearized_layers(model)[2].mixer
    planted.register_forward_hook(lambda mixer, args, out: (out[0] * 40.0, out[1]))  # a broken mixer
    torch.manual_seed(0)
    with torch.no_grad():  # text the teacher predicts well, so that a broken layer costs loss
        text = teacher.generate(torch.randint(3, 128, (3, 2)), max_new_tokens=28, do_sample=True, top_k=4)
    blocks = [text[:2], text[2:]]
    result = layer_scores(model, blocks)
    assert set(result["scores"]) == {0, 1, 2, 3}
    assert max(result["scores"], key=result["scores"].get) == 2 and result["scores"][2] > 0
    assert choose_layers(result["scores"], 1) == [2]
    assert choose_layers(result["scores"], 0) == []
    assert 2 in choose_layers(result["scores"], 2)


def test_choices_spacing_and_complement():
    assert choose_layers({0: 0.1, 1: 0.3, 2: 0.3, 3: -0.2}, 2) == [1, 2]
    assert choose_layers({0: 0.5, 1: 0.5, 2: 0.1}, 1) == [0]  # a tie: the lower index
    assert evenly_spaced(30, 1) == [15] and evenly_spaced(30, 2) == [7, 22]
    assert evenly_spaced(30, 4) == [3, 11, 18, 26] and evenly_spaced(30, 0) == []
    assert linearized_complement(5, [1, 3]) == [0, 2, 4]
    with pytest.raises(ValueError, match="k must be 0 to the 3 scored layers"):
        choose_layers({0: 0.1, 1: 0.2, 2: 0.3}, 4)
    with pytest.raises(ValueError, match="k must be 0 to 30"):
        evenly_spaced(30, 31)


def test_the_select_layers_command_writes_the_scores_into_the_run_folder(tiny_world, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_world, "hedgehog", **{"stage2.enabled": False})
    assert main(["run", RECIPE, *overrides, "--out", str(out)]) == 0
    capsys.readouterr()
    args = ["select-layers", str(out), "--sources", tiny_world["ood"], "--seq-len", "64", "--blocks", "1"]
    assert main([*args, "--k", "1"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "layer_scores.json").read_text())
    layers = len(report["scores"])
    assert report["k"] == 1 and len(report["chosen"]) == 1
    assert report["chosen"] == [int(max(report["scores"], key=report["scores"].get))]
    assert report["mixer_layers"] == [i for i in range(layers) if i not in report["chosen"]]
    assert "mixer.layers=" in printed
    assert main([*args, "--k", "-1"]) == 2
    assert "--k must be >= 0" in capsys.readouterr().err
    assert main([*args, "--k", str(layers + 1)]) == 2
    assert f"only {layers} converted layers" in capsys.readouterr().err
    assert main(["select-layers", str(out / "model"), "--k", "1"]) == 2
    assert "not a run folder: give --out" in capsys.readouterr().err
