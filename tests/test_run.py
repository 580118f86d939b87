"""`zoo run` end to end on a tiny model and text files: outputs, kill-and-resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from zoo_testing import RECIPE, ForkedZoo, tiny_overrides

import zoo
from zoo.cli import main


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """References and token caches of these runs stay out of the user's zoo cache."""
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path_factory.getbasetemp() / "zoo-cache"))


def test_run_writes_the_run_folder(tiny_world, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_overrides(tiny_world, **{"eval.teacher_lora": True, "eval.mmlu": 4})
    assert main(["run", RECIPE, *args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "swap only" in printed and "final (stage 2)" in printed and "MMLU 5-shot" in printed
    assert "repeated 4-grams in greedy continuations (4 held-out prompts, 48 tokens): teacher " in printed
    assert (
        "greedy continuation of 'Once upon a time':\n  teacher: '" in printed and "\n  model:   '" in printed
    )
    for name in (
        "recipe.yaml",
        "metrics.jsonl",
        "summary.json",
        "model/config.json",
        "model/model.safetensors",
    ):
        assert (out / name).exists(), name
    s = json.loads((out / "summary.json").read_text())
    for key in ("ppl_teacher", "ppl_teacher_lora", "ppl_swap", "ppl_stage1", "ppl_final"):
        assert s[key]["heldout"] > 1 and s[key]["ood"] > 1, key
    assert s["tokens_stage1"] == 32 * 2 * 6 and s["tokens_stage2"] == 32 * 2 * 6
    assert s["trainable_params"] > 0 and s["seconds_stage1"] > 0 and s["seconds_stage2"] > 0
    assert set(s["layer_mse_stage1"]) == {"0", "1"}
    assert s["mmlu"]["teacher"]["n"] == 4 and 0 <= s["mmlu"]["final"]["accuracy"] <= 1
    for side in ("teacher", "final"):  # the recipe's default: 4 held-out prompts continued for 48 tokens
        assert s["generation"][side]["prompts"] == 4 and 0 <= s["generation"][side]["repeated_4grams"] <= 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "stage1"] == list(range(1, 7))
    assert all("layer_loss" in r for r in rows if r["stage"] == "stage1")
    model, tok = zoo.load_linearized(out / "model")
    assert tok is not None and model.config.zoo_mixers[0]["mixer"] == "hedgehog"
    # the fair reference is computed once and reused by the next run with the same budget
    assert (
        main(
            [
                "run",
                RECIPE,
                *tiny_overrides(tiny_world, **{"eval.teacher_lora": True}),
                "--out",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )
    assert "fair reference" not in capsys.readouterr().err
    assert (
        json.loads((tmp_path / "again" / "summary.json").read_text())["ppl_teacher_lora"]
        == s["ppl_teacher_lora"]
    )


def test_stage2_distilled_from_the_fair_reference(tiny_world, tmp_path, capsys):
    """distill_from=reference computes the fair reference (eval.teacher_lora off) and distills from it."""
    from zoo.recipe import load_recipe
    from zoo.reference import teacher_lora_folder

    args = tiny_overrides(
        tiny_world,
        **{"stage2.distill": 0.5, "stage2.distill_from": "reference", "eval.generation_prompts": 0},
    )
    assert main(["run", RECIPE, *args, "--out", str(tmp_path / "run")]) == 0
    folder, _ = teacher_lora_folder(load_recipe(tmp_path / "run" / "recipe.yaml"))
    assert (folder / "result.json").exists()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stage2 = [r for r in rows if r["stage"] == "stage2"]
    assert len(stage2) == 6 and all(
        r["kl"] > 0 and r["loss"] == pytest.approx(r["ce"] + 0.5 * r["kl"], rel=1e-5) for r in stage2
    )


@pytest.mark.parametrize("kill_at, extra", [("stage1:3", {}), ("stage2:5", {"stage2.distill": 0.5})])
def test_sigkill_then_rerun_gives_the_same_result(tiny_world, tmp_path, kill_at, extra):
    """Killed in stage 1, or in a distilled stage 2: the rerun ends where an uninterrupted run ends."""
    args = [
        "run",
        RECIPE,
        *tiny_overrides(tiny_world, "lolcats", **{"mixer.options": {"window": 8}, **extra}),
    ]
    zoo_cli = ForkedZoo(tmp_path / "logs")  # fresh processes, forked without paying the imports again
    code, log = zoo_cli.run([*args, "--out", str(tmp_path / "straight")])
    assert code == 0, log[-2000:]
    code, log = zoo_cli.run([*args, "--out", str(tmp_path / "cut")], {"ZOO_FAULT_KILL_AT": kill_at})
    assert code == -9, log[-2000:]
    assert not (tmp_path / "cut" / "summary.json").exists()
    code, log = zoo_cli.run([*args, "--out", str(tmp_path / "cut")])
    assert code == 0, log[-2000:]
    stage = kill_at.split(":")[0]
    assert f"{stage}: resuming from step" in log
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    sa = json.loads((tmp_path / "straight" / "summary.json").read_text())
    sb = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert sb["ppl_final"]["heldout"] == pytest.approx(sa["ppl_final"]["heldout"], rel=1e-5)
    assert sb["final_loss_stage2"] == pytest.approx(sa["final_loss_stage2"], rel=1e-5)
    stage2_rows = [
        json.loads(line)
        for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["stage"] == "stage2"
    ]
    assert len(stage2_rows) == 6 and all(("kl" in r) == bool(extra) for r in stage2_rows)


def test_generate_and_eval_commands(tiny_world, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                RECIPE,
                *tiny_overrides(tiny_world, "linear-elu", **{"stage2.enabled": False}),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["generate", str(out), "The king", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    assert (
        main(["eval", str(out), "--sources", tiny_world["ood"], "--seq-len", "32", "--max-blocks", "2"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result[tiny_world["ood"]]["ppl"] > 1


def test_a_run_measures_long_context_beside_the_teacher_and_the_free_window(tiny_world, tmp_path, capsys):
    out = tmp_path / "run"
    extra = {
        "mixer.options": {"window": 8, "sinks": 2},
        "eval.long_context": 512,
        "eval.long_context_blocks": 1,
        "eval.teacher_lora": True,
    }
    assert main(["run", RECIPE, *tiny_overrides(tiny_world, "lolcats", **extra), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = json.loads((out / "summary.json").read_text())["long_context"]
    assert table["free_window"] == [8, 4]
    assert set(table["rows"]) == {"teacher", "free_window", "fair_reference", "final"}
    for name, per_source in table["rows"].items():
        assert list(per_source) == [tiny_world["train"], tiny_world["ood"]], name
        for cells in per_source.values():
            assert list(cells) == ["0-256", "256-512"] and all(c["ppl"] > 1 for c in cells.values())
    shares = table["gap_closed"]["final"][tiny_world["ood"]]
    assert set(shares) == {"0-256", "256-512"}
    assert (
        "long context" in printed and "gap closed: model" in printed and "free window (8+4 sinks)" in printed
    )
    # the teacher's side (teacher and free window) is cached: a second run does not measure it again
    again = tmp_path / "again"
    assert main(["run", RECIPE, *tiny_overrides(tiny_world, "lolcats", **extra), "--out", str(again)]) == 0
    err = capsys.readouterr().err
    assert "teacher: long_context" not in err and "fair reference: long_context" not in err
    second = json.loads((again / "summary.json").read_text())["long_context"]
    assert second["rows"]["free_window"] == table["rows"]["free_window"]


def test_stages_train_at_their_own_lengths_short_to_long(tiny_world, tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides(tiny_world, "hedgehog", **{"stage2.seq_len": 64, "eval.teacher_lora": True})
    assert main(["run", RECIPE, *args, "--out", str(out)]) == 0
    progress = json.loads((out / "progress.json").read_text())
    s1, s2 = progress["stage1_train"], progress["stage2_train"]
    assert s1["tokens"] == s1["steps"] * 2 * 32  # stage 1 at data.seq_len (32), batch 2
    assert s2["tokens"] == s2["steps"] * 2 * 64 and s2["steps"] == 3  # stage 2 at 64: 384 tokens in 3 steps
    assert progress["teacher_lora_train"]["steps"] == 3  # the fair reference trains as stage 2 does
    assert main(["run", RECIPE, *args[:-1], "stage2.seq_len=1", "--out", str(tmp_path / "bad")]) == 2


def test_eval_measures_long_context_and_the_teachers_passkey(tiny_world, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_world, "lolcats", **{"mixer.options": {"window": 8}, "stage2.enabled": False}
    )
    assert main(["run", RECIPE, *overrides, "--out", str(out)]) == 0
    capsys.readouterr()
    args = ["eval", str(out), "--sources", tiny_world["ood"], "--max-blocks", "1", "--long", "512"]
    assert (
        main(
            [*args, "--long-blocks", "1", "--passkey", "300", "--passkey-keys", "3", "--passkey-trials", "2"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["long_context"]["free_window"] == [8, 4]  # the model's own window, at least 4 sinks
    assert set(result["long_context"]["rows"]) == {"teacher", "free_window", "final"}
    assert result["passkey"]["keys"] == 3 and result["passkey"]["teacher"]["keys"] == 3
    assert main([*args, "--window", "16", "--sinks", "1", "--teacher", "none"]) == 0
    alone = json.loads(capsys.readouterr().out)["long_context"]
    assert set(alone["rows"]) == {"final"} and alone["free_window"] is None
    # LoLA's sparse cache on the trained weights, without training (zoo.swap_mixers)
    assert main([*args, "--teacher", "none", "--mixer", "lola", "--mixer-option", "cache_size=4"]) == 0
    swapped = json.loads(capsys.readouterr().out)
    assert swapped["swapped_mixer"] == {"mixer": "lola", "options": {"cache_size": 4}}
    assert set(swapped["long_context"]["rows"]) == {"final"}
    assert main([*args, "--window", "0", "--sinks", "0"]) == 2
    assert "no key to attend to" in capsys.readouterr().err
    assert main([*args[:-1], "100"]) == 2
    assert "--long must be a block length >= 512" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad, message",
    [
        (["stage1.lrr=0.1"], "stage1.lrr"),
        (["stage1.lr=fast"], "stage1.lr"),
        (["mixer.name=nope"], "unknown mixer 'nope'"),
    ],
)
def test_bad_input_gets_a_clear_error(tiny_world, tmp_path, capsys, bad, message):
    assert main(["run", RECIPE, *tiny_overrides(tiny_world), *bad, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err


def test_too_short_data_is_a_clear_error(tiny_world, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    args = tiny_overrides(tiny_world, **{"data.train": [str(short)]})
    assert main(["run", RECIPE, *args, "--out", str(tmp_path / "x")]) == 2
    assert "tokens" in capsys.readouterr().err


def test_list_shows_every_mixer(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in zoo.list_mixers():
        assert name in out


def test_info_prints_environment_teacher_and_corpus(tiny_world, capsys):
    assert (
        main(["info", "--model", tiny_world["model"], "--sources", tiny_world["train"], tiny_world["ood"]])
        == 0
    )
    out = capsys.readouterr().out
    assert "torch" in out and "transformers" in out and "2 layers, 4 heads, 2 KV heads" in out
    assert tiny_world["train"] in out and tiny_world["ood"] in out


def test_plugin_mixers_register_through_entry_points(monkeypatch):
    """A third-party package's `zoo.mixers` entry point is imported when the registry is read."""
    import types

    from zoo.mixers import base

    def load():
        @base.register_mixer("plugin-test-mixer")
        class PluginMixer(base.Mixer):
            description = "from a plugin"

        return PluginMixer

    entry = types.SimpleNamespace(name="plugin-test-mixer", value="zoo_test_plugin:PluginMixer", load=load)
    monkeypatch.setattr(base, "entry_points", lambda group: [entry] if group == "zoo.mixers" else [])
    monkeypatch.setattr(base, "_entry_points_loaded", False)
    try:
        assert "plugin-test-mixer" in zoo.list_mixers()
        assert zoo.get_mixer("plugin-test-mixer").description == "from a plugin"
    finally:
        base._REGISTRY.pop("plugin-test-mixer", None)


def test_demo_runs_the_lolcats_sink_recipe_at_the_demo_budget(monkeypatch, tmp_path):
    import zoo.run

    seen = {}

    def fake_run_recipe(recipe, out, redo=()):
        seen["recipe"], seen["out"] = recipe, out
        raise SystemExit(0)  # stop before any training: only what the demo asks for is checked here

    monkeypatch.setattr(zoo.run, "run_recipe", fake_run_recipe)
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "demo")])
    recipe = zoo.recipe.load_recipe(zoo.cli.DEMO_RECIPE)
    assert zoo.cli.DEMO_RECIPE.parent.name == "smollm2-135m"
    assert zoo.cli.DEMO_RECIPE.name == "lolcats-terraced-sink.yaml"  # the best at 256 tokens and past 1k
    assert seen["recipe"].mixer == recipe.mixer and seen["recipe"].mixer.name.startswith("lolcats")
    assert seen["recipe"].stage1.tokens == 61_440 < recipe.stage1.tokens
    assert seen["recipe"].eval.long_context == 2048  # the demo prints the long-range figure too
    with pytest.raises(SystemExit):  # the user's overrides come after the demo's, so they win
        main(["demo", "stage1.tokens=1024", "--out", str(tmp_path / "demo")])
    assert seen["recipe"].stage1.tokens == 1024
