"""`zoo bench quality` on a tiny random model with the smoke budget: every output and field, resume,
the recipe template, the budgets and bad input."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

import zoo
from zoo.bench.budgets import BUDGETS, get_budget
from zoo.bench.quality import RECIPES_ROOT, STAGE2_KEYS, mixer_recipe, own_recipe
from zoo.bench.results import ROW_FIELDS
from zoo.cli import main
from zoo.recipe import MixerConfig, load_recipe
from zoo.reference import teacher_lora_folder

MIXERS = "lolcats,hedgehog,softmax"
RECIPES = RECIPES_ROOT / "smollm2-135m"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """References of these runs stay out of the user's zoo cache."""
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path_factory.getbasetemp() / "zoo-cache"))


@pytest.fixture(scope="module")
def tiny_recipes(tmp_path_factory) -> Path:
    """Recipes for blocks of 32 tokens: the template (SmolLM2's bench.yaml) with an 8-token lolcats
    window (so both branches matter), which is also lolcats' own recipe; hedgehog as in SmolLM2's; the
    other mixers have none and run with their defaults."""
    folder = tmp_path_factory.mktemp("recipes")
    template = load_recipe(RECIPES / "bench.yaml", ["mixer.options.window=8", "mixer.options.feature_dim=16"])
    (folder / "bench.yaml").write_text(template.to_yaml())
    (folder / "hedgehog.yaml").write_text((RECIPES / "hedgehog.yaml").read_text())
    return folder


def bench_args(world, out: Path, recipes: Path, mixers: str = MIXERS, budget: str = "smoke") -> list[str]:
    return [
        "bench",
        "quality",
        "--model",
        world["model"],
        "--mixers",
        mixers,
        "--budget",
        budget,
        "--out",
        str(out),
        "--recipes",
        str(recipes),
        "--set",
        f"data.train={json.dumps([world['train']])}",
        "--set",
        f"data.eval_ood={json.dumps([world['ood']])}",
        "--set",
        "device=cpu",
    ]


@pytest.fixture(scope="module")
def bench(tiny_world, tiny_recipes, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quality"
    code = main(bench_args(tiny_world, out, tiny_recipes))
    return {
        "out": out,
        "code": code,
        "recipes": tiny_recipes,
        "results": json.loads((out / "results.json").read_text()),
    }


def rows_by_name(results: dict) -> dict[str, dict]:
    return {r["name"]: r for r in results["rows"]}


def test_bench_runs_every_mixer_reference_and_ablation(bench):
    assert bench["code"] == 0
    rows = rows_by_name(bench["results"])
    assert set(rows) == {
        "teacher",
        "teacher + LoRA",
        "lolcats",
        "hedgehog",
        "softmax",
        "t2r",
        "linear-elu",  # the feature-map ablation adds the maps not asked for
        "lolcats [LoRA only]",
        "lolcats [window branch]",
        "lolcats [linear branch]",
    }
    for row in rows.values():
        assert tuple(row) == ROW_FIELDS, row["name"]
        assert row["status"] == "done" and row["error"] is None
    assert [r["kind"] for r in bench["results"]["rows"][:2]] == ["reference", "reference"]
    assert rows["t2r"]["ablation"] == "feature-map" and rows["hedgehog"]["kind"] == "mixer"


def test_results_metadata(bench, tiny_world):
    r = bench["results"]
    assert r["model"] == tiny_world["model"] and r["budget"] == BUDGETS["smoke"].to_dict()
    assert r["seed"] == 0 and r["device"].startswith("cpu")
    assert {"zoo", "torch", "transformers", "python"} <= set(r["versions"])
    assert r["command"].startswith("zoo bench quality --model ") and "--budget smoke" in r["command"]
    assert "--mixers lolcats,hedgehog,softmax" in r["command"] and "--set device=cpu" in r["command"]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_every_metric_of_a_mixer_row(bench):
    rows = rows_by_name(bench["results"])
    smoke = BUDGETS["smoke"]
    for name in ("lolcats", "hedgehog", "softmax", "t2r", "linear-elu"):
        row = rows[name]
        for key in ("ppl_heldout", "ppl_ood"):
            assert row[key] > 1, (name, key)
        for key in (
            "bpb_heldout",
            "bpb_ood",
            "ratio_to_fair_reference",
            "ratio_ood_to_teacher",
            "gap_closed_heldout",
            "gap_closed_ood",
            "mean_layer_mse_swap",
            "seconds_stage2",
            "decode_tokens_per_s",
        ):
            if (name, key) != (
                "softmax",
                "gap_closed_ood",
            ):  # softmax swapped in is the teacher: no gap to close
                assert _finite(row[key]), (name, key)
        assert len(row["per_source"]) == 2  # the training corpus and the out-of-domain one
        assert set(row["stages"]) == {"teacher", "swap", "stage1", "final"}
        assert (
            0 <= row["mmlu_accuracy"] <= 1
            and row["mmlu_n"] == smoke.mmlu
            and row["mmlu_teacher_accuracy"] is not None
        )
        assert set(row["passkey"]) == set(row["passkey_teacher"]) == {"256"}
        assert 0 <= row["repeated_4grams"] <= 1 and 0 <= row["repeated_4grams_teacher"] <= 1
        assert len(row["generation_samples"]) == 2 and all(
            isinstance(t, str) for t in row["generation_samples"]
        )
        assert 0 < row["trainable_params"] and 0 < row["trainable_percent"] < 100
        assert row["tokens_stage2"] == smoke.stage2_tokens
        assert row["peak_rss_bytes_stage2"] > 10 * 2**20  # the process holds torch: tens of MiB at least
        assert row["decode_context"] == smoke.decode_contexts[-1] and row["state_bytes"] > 0
        assert set(row["decode_by_context"]) == {str(c) for c in smoke.decode_contexts}
        assert len(row["loss_curve_stage2"]) == smoke.stage2_tokens // (smoke.batch_size * smoke.seq_len)
        assert row["run_dir"] == name and row["ppl_heldout"] == row["stages"]["final"]["heldout"]
        assert row["device"] == bench["results"]["device"] and row["device"].startswith(
            "cpu ("
        )  # where it ran
    for name in ("lolcats", "hedgehog", "t2r"):  # mixers with parameters go through stage 1
        assert rows[name]["tokens_stage1"] == smoke.stage1_tokens and rows[name]["peak_rss_bytes_stage1"] > 0
        assert _finite(rows[name]["mean_layer_mse_stage1"]) and _finite(rows[name]["seconds_stage1"])
    for name in ("softmax", "linear-elu"):  # nothing to transfer
        assert rows[name]["tokens_stage1"] == 0 and rows[name]["mean_layer_mse_stage1"] is None
    assert rows["softmax"]["mean_layer_mse_swap"] == pytest.approx(
        0.0, abs=1e-8
    )  # the teacher's own attention
    assert rows["softmax"]["stages"]["swap"]["ood"] == rows["teacher"]["ppl_ood"]
    assert rows["softmax"]["gap_closed_ood"] is None


def test_state_bytes_follow_the_state_shape(bench):
    rows = rows_by_name(bench["results"])
    smoke = BUDGETS["smoke"]
    for name in ("hedgehog", "lolcats"):  # constant state (lolcats: its 64-token window is full at 96)
        assert rows[name]["state_growth"] == "constant"
        assert rows[name]["state_bytes_32k_extrapolated"] == rows[name]["state_bytes"]
    for name in ("softmax", "teacher"):  # a KV cache grows with the context
        row = rows[name]
        assert row["state_growth"] == "linear"
        assert row["state_bytes_32k_extrapolated"] == row["state_bytes"] * 32768 // smoke.decode_contexts[-1]
    assert rows["softmax"]["state_bytes"] >= rows["teacher"]["state_bytes"] > rows["hedgehog"]["state_bytes"]


def test_reference_rows(bench):
    rows = rows_by_name(bench["results"])
    teacher, fair = rows["teacher"], rows["teacher + LoRA"]
    assert teacher["ratio_ood_to_teacher"] == 1.0 and teacher["trainable_params"] == 0
    assert teacher["ppl_heldout"] == rows["lolcats"]["stages"]["teacher"]["heldout"]
    assert teacher["mmlu_accuracy"] == rows["hedgehog"]["mmlu_teacher_accuracy"]
    assert teacher["passkey"] == rows["hedgehog"]["passkey_teacher"] and teacher["decode_tokens_per_s"] > 0
    assert teacher["repeated_4grams"] == rows["hedgehog"]["repeated_4grams_teacher"] is not None
    assert fair["ratio_to_fair_reference"] == 1.0 and fair["trainable_params"] > 0
    assert fair["tokens_stage2"] == BUDGETS["smoke"].stage2_tokens and fair["loss_curve_stage2"]
    assert rows["lolcats"]["ratio_to_fair_reference"] == pytest.approx(
        rows["lolcats"]["ppl_heldout"] / fair["ppl_heldout"]
    )


def test_ablation_rows(bench):
    rows = rows_by_name(bench["results"])
    smoke = BUDGETS["smoke"]
    lora_only = rows["lolcats [LoRA only]"]
    assert lora_only["ablation"] == "lora-only" and lora_only["tokens_stage1"] == 0
    assert lora_only["tokens_stage2"] == smoke.stage1_tokens + smoke.stage2_tokens
    assert lora_only["ratio_to_fair_reference"] == pytest.approx(
        lora_only["ppl_heldout"] / rows["teacher + LoRA"]["ppl_heldout"]
    )
    window, linear = rows["lolcats [window branch]"], rows["lolcats [linear branch]"]
    assert window["ablation"] == "window-branch" and linear["ablation"] == "linear-branch"
    assert len({window["ppl_heldout"], linear["ppl_heldout"], rows["lolcats"]["ppl_heldout"]}) == 3
    assert set(window["passkey"]) == {"256"} and _finite(window["gap_closed_heldout"])
    assert rows["hedgehog"]["ablation"] is None and "hedgehog [window branch]" not in rows


def test_leaderboard_and_plots(bench):
    out = bench["out"]
    board = (out / "leaderboard.md").read_text()
    assert board.startswith("# Quality leaderboard")
    smoke = BUDGETS["smoke"]
    assert (
        f"stage 1 {smoke.stage1_tokens:,} tokens (batch {smoke.stage1_batch_size}), "
        f"stage 2 {smoke.stage2_tokens:,} tokens (batch {smoke.batch_size})"
    ) in board
    quality = board.split("## Quality")[1].split("## Cost")[0]
    lines = [line for line in quality.splitlines() if line.startswith("| ")][1:]
    assert lines[0].startswith("| **teacher**") and lines[1].startswith("| **teacher + LoRA**")
    header = next(line for line in quality.splitlines() if line.startswith("|  | family"))
    assert "| passkey 256 | repeats | transfer MSE |" in header
    teacher_repeats = rows_by_name(bench["results"])["teacher"]["repeated_4grams"]
    assert lines[0].split(" | ")[header.split(" | ").index("repeats")] == f"{teacher_repeats:.2f}"
    ratios = [
        rows_by_name(bench["results"])[line.split(" | ")[0][2:]]["ratio_to_fair_reference"]
        for line in lines[2:]
    ]
    assert len(ratios) == 3 and ratios == sorted(ratios)  # the mixers, best first
    for section in ("## Cost", "## Perplexity by stage", "LoRA alone", "feature maps", "window branch alone"):
        assert section in board
    for name in (
        "quality_vs_params.png",
        "loss_curves_stage2.png",
        "decode_vs_context.png",
        "state_vs_context.png",
    ):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_finished_mixers_are_not_redone_and_an_interrupted_one_resumes(bench, tiny_world, capsys):
    out = bench["out"]
    before = rows_by_name(bench["results"])
    capsys.readouterr()
    assert main(bench_args(tiny_world, out, bench["recipes"])) == 0
    err = capsys.readouterr().err
    assert err.count("already finished") == 6 and "starting" not in err and "resuming" not in err
    # interrupted after stage 2: no summary yet, progress.json and checkpoints are there
    (out / "hedgehog" / "summary.json").unlink()
    assert main(bench_args(tiny_world, out, bench["recipes"])) == 0
    err = capsys.readouterr().err
    assert "hedgehog: resuming" in err and err.count("already finished") == 5
    after = rows_by_name(json.loads((out / "results.json").read_text()))
    assert after["hedgehog"]["ppl_heldout"] == before["hedgehog"]["ppl_heldout"]
    assert after["lolcats"] == before["lolcats"]


def test_a_changed_budget_in_the_same_folder_is_an_error(bench, tiny_world, tmp_path, capsys):
    budget = tmp_path / "more.yaml"
    budget.write_text("base: smoke\nstage2_tokens: 128\n")
    assert main(bench_args(tiny_world, bench["out"], bench["recipes"], budget=str(budget))) == 2
    assert "holds a run of another recipe" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--mixers", "lolcats,nope", "unknown mixer(s) ['nope']; registered mixers: "),
        ("--budget", "huge", "unknown budget 'huge'; named budgets: smoke, quick, standard"),
        ("--ablations", "lora-only,dropout", "unknown ablation(s) ['dropout']"),
        ("--jobs", "0", "--jobs must be >= 1, got 0"),
    ],
)
def test_bad_input_gets_a_clear_error(tiny_world, tiny_recipes, tmp_path, capsys, flag, value, message):
    args = bench_args(tiny_world, tmp_path / "x", tiny_recipes) + [flag, value]  # the last occurrence wins
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_every_mixer_gets_its_own_settings_and_the_same_stage2():
    template = load_recipe(RECIPES / "bench.yaml")
    budget = BUDGETS["quick"]
    recipes = {
        m: mixer_recipe(template, m, RECIPES, "smollm2-135m", budget, ["device=cpu"])
        for m in zoo.list_mixers()
    }
    based = load_recipe(RECIPES / "based.yaml")
    assert (
        recipes["based"].mixer == based.mixer
        and recipes["based"].stage1.lr == based.stage1.lr != template.stage1.lr
    )
    # lolcats.yaml runs the terraced window; the bench's plain lolcats is the template's own
    assert recipes["lolcats-terraced"].mixer == load_recipe(RECIPES / "lolcats.yaml").mixer
    assert recipes["lolcats"].mixer == template.mixer and template.mixer.name == "lolcats"
    for m, r in recipes.items():
        own = RECIPES / f"{m}.yaml"
        if m not in ("lolcats", "lolcats-terraced"):
            expected = (
                load_recipe(own).mixer if own.exists() else MixerConfig(name=m, layers=template.mixer.layers)
            )
            assert r.mixer == expected, m
        assert (
            r.mixer.name == m and r.stage1.tokens == budget.stage1_tokens and r.data.seq_len == budget.seq_len
        )
        assert (
            r.eval.passkey_lengths == list(budget.passkey_lengths)
            and r.eval.teacher_lora
            and r.device == "cpu"
        )
        assert (
            (r.stage1.batch_size, r.stage2.batch_size)
            == (budget.stage1_batch_size, budget.batch_size)
            == (1, 4)
        )

    # one fair reference serves all: stage 2 (but for whether the mixer trains in it), data, model and eval
    # blocks are the same for every mixer
    def shared(r):
        d = r.to_dict()
        d["stage2"] = {k: v for k, v in d["stage2"].items() if k not in STAGE2_KEYS}
        return json.dumps({k: d[k] for k in ("model", "data", "stage2", "seed")}, sort_keys=True)

    assert len({shared(r) for r in recipes.values()}) == 1
    assert len({teacher_lora_folder(r)[0] for r in recipes.values()}) == 1
    # whether the mixer keeps learning in stage 2 is the mixer's own recipe's (lolcats.yaml: the terraced
    # window's)
    for m, r in recipes.items():
        own = own_recipe(m, RECIPES)
        assert r.stage2.train_mixer == (
            load_recipe(own).stage2.train_mixer if own else template.stage2.train_mixer
        ), m
    assert recipes["lolcats-terraced"].stage2.train_mixer and recipes["gated-delta-conv"].stage2.train_mixer
    assert not recipes["hedgehog"].stage2.train_mixer and not recipes["lolcats"].stage2.train_mixer


def _recipe_for(folder: Path, file: str, mixer: str, lr: float) -> None:
    (folder / file).write_text(
        load_recipe(RECIPES / "bench.yaml", [f"mixer.name={mixer}", f"stage1.lr={lr}"]).to_yaml()
    )


def test_a_mixers_own_recipe_is_the_file_for_that_mixer(tmp_path):
    _recipe_for(tmp_path, "bench.yaml", "lolcats", 1e-2)
    _recipe_for(
        tmp_path, "lolcats.yaml", "lolcats-terraced", 2e-2
    )  # named after one mixer, a recipe for another
    _recipe_for(tmp_path, "hedgehog.yaml", "hedgehog", 3e-2)
    _recipe_for(tmp_path, "my-t2r.yaml", "t2r", 4e-2)
    (tmp_path / "notes.yaml").write_text("- not a recipe\n")
    own = {m: own_recipe(m, tmp_path) for m in ("lolcats", "lolcats-terraced", "hedgehog", "t2r", "based")}
    assert own == {
        "lolcats": tmp_path / "bench.yaml",
        "lolcats-terraced": tmp_path / "lolcats.yaml",
        "hedgehog": tmp_path / "hedgehog.yaml",
        "t2r": tmp_path / "my-t2r.yaml",
        "based": None,
    }
    template = load_recipe(tmp_path / "bench.yaml")
    lr = {m: mixer_recipe(template, m, tmp_path, "smollm2-135m", BUDGETS["smoke"], []).stage1.lr for m in own}
    assert lr == {"lolcats": 1e-2, "lolcats-terraced": 2e-2, "hedgehog": 3e-2, "t2r": 4e-2, "based": 1e-2}
    # the other stage-1 optimizer settings come along with the learning rate
    (tmp_path / "hedgehog.yaml").write_text(
        load_recipe(tmp_path / "hedgehog.yaml", ["stage1.adam_betas=[0.8,0.95]"]).to_yaml()
    )
    betas = {
        m: mixer_recipe(template, m, tmp_path, "smollm2-135m", BUDGETS["smoke"], []).stage1.adam_betas
        for m in ("hedgehog", "t2r")
    }
    assert betas == {"hedgehog": [0.8, 0.95], "t2r": [0.9, 0.999]}
    # and from stage 2 only whether the mixer trains: the rest of stage 2 is the template's, for every mixer
    (tmp_path / "hedgehog.yaml").write_text(
        load_recipe(tmp_path / "hedgehog.yaml", ["stage2.train_mixer=true", "stage2.lr=1e-3"]).to_yaml()
    )
    stage2 = {
        m: mixer_recipe(template, m, tmp_path, "smollm2-135m", BUDGETS["smoke"], []).stage2
        for m in ("hedgehog", "t2r")
    }
    assert (stage2["hedgehog"].train_mixer, stage2["t2r"].train_mixer) == (True, False)
    assert stage2["hedgehog"].lr == stage2["t2r"].lr == template.stage2.lr != 1e-3
    _recipe_for(tmp_path, "t2r-again.yaml", "t2r", 5e-2)
    with pytest.raises(
        ValueError, match=r"several recipes in .* are for mixer 't2r' \(my-t2r.yaml, t2r-again.yaml\)"
    ):
        own_recipe("t2r", tmp_path)
    _recipe_for(tmp_path, "t2r.yaml", "t2r", 6e-2)  # the file named after it settles it
    assert own_recipe("t2r", tmp_path) == tmp_path / "t2r.yaml"


def test_a_recipes_folder_without_the_template_is_an_error(tiny_world, tmp_path, capsys):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "hedgehog.yaml").write_text((RECIPES / "hedgehog.yaml").read_text())
    assert main(bench_args(tiny_world, tmp_path / "x", folder)) == 2
    assert (
        f"{folder} has no bench.yaml (the recipe every mixer of the bench starts from)"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "x").exists()


def test_budget_files_and_the_quick_budget_size(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"base": "smoke", "stage1_tokens": 128, "passkey_lengths": [200, 300]}))
    mine = get_budget(str(path))
    assert mine.name == "mine" and mine.stage1_tokens == 128 and mine.passkey_lengths == (200, 300)
    assert mine.stage2_tokens == BUDGETS["smoke"].stage2_tokens
    path.write_text("base: smoke\nstage_one_tokens: 5\n")
    with pytest.raises(ValueError, match="unknown field.*stage_one_tokens"):
        get_budget(str(path))
    path.write_text("base: smoke\nstage1_tokens: many\n")
    with pytest.raises(ValueError, match="stage1_tokens must be int"):
        get_budget(str(path))
    # sized for ~3.5 minutes per mixer all-in on 2 CPU cores (see zoo.bench.budgets.THROUGHPUT)
    assert 150 < BUDGETS["quick"].estimate_seconds() < 215


def test_parallel_jobs_give_the_rows_of_one_process(bench, tiny_world, tmp_path, capsys):
    out = tmp_path / "parallel"
    assert main(bench_args(tiny_world, out, bench["recipes"]) + ["--jobs", "2"]) == 0
    assert "run(s) left, 2 at a time" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert "--jobs 2" in results["command"]
    parallel, serial = rows_by_name(results), rows_by_name(bench["results"])
    assert set(parallel) == set(serial)
    for name, row in serial.items():
        assert parallel[name]["status"] == "done", name
        for key in (
            "ppl_heldout",
            "ppl_ood",
            "mean_layer_mse_stage1",
        ):  # 1 thread per worker: fp32 sums may differ
            assert (parallel[name][key] is None) == (row[key] is None), (name, key)
            if row[key] is not None:
                assert parallel[name][key] == pytest.approx(row[key], rel=1e-3), (name, key)


def test_report_writes_the_outputs_and_runs_nothing(bench, tiny_world, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(bench["out"], out)
    (out / "results.json").unlink()
    (out / "leaderboard.md").unlink()
    summary = (out / "lolcats" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    args = bench_args(tiny_world, out, bench["recipes"], mixers=MIXERS + ",gla") + ["--report"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "starting" not in err and "resuming" not in err and "6 of 7 run(s) finished" in err
    assert not (out / "gla").exists() and (out / "lolcats" / "summary.json").stat().st_mtime_ns == summary
    rows = rows_by_name(json.loads((out / "results.json").read_text()))
    assert rows["gla"]["status"] == "pending"
    assert rows["lolcats"] == rows_by_name(bench["results"])["lolcats"] | {"run_dir": "lolcats"}
    board = (out / "leaderboard.md").read_text()
    assert board.startswith("# Quality leaderboard") and "## Not run yet\n\ngla (" in board


def test_a_subset_run_into_the_folder_keeps_the_rows_already_there(bench, tiny_world, tmp_path):
    out = tmp_path / "grown"
    shutil.copytree(bench["out"], out)
    written = json.loads((out / "results.json").read_text())
    del written["budget"]["generation_tokens"]  # as written before that budget field existed: the same bench
    (out / "results.json").write_text(json.dumps(written))
    gla_only = bench_args(tiny_world, out, bench["recipes"], mixers="gla") + ["--ablations", "none"]
    assert main(gla_only) == 0
    results = json.loads((out / "results.json").read_text())
    rows, before = rows_by_name(results), rows_by_name(bench["results"])
    assert set(rows) == set(before) | {"gla"} and rows["gla"]["status"] == "done"
    assert (
        rows["lolcats"] == before["lolcats"]
        and rows["lolcats [window branch]"] == before["lolcats [window branch]"]
    )
    assert [r["name"] for r in results["rows"][:2]] == ["teacher", "teacher + LoRA"]
    assert results["earlier_commands"] == [bench["results"]["command"]] and "gla" in results["command"]
    board = (out / "leaderboard.md").read_text()
    assert f"- rows kept from an earlier command: `{bench['results']['command']}`" in board
    assert "\n| gla |" in board and "\n| lolcats |" in board
    # a run folder removed: its row goes with it; the others stay
    shutil.rmtree(out / "hedgehog")
    assert main(gla_only + ["--report"]) == 0
    rows = rows_by_name(json.loads((out / "results.json").read_text()))
    assert "hedgehog" not in rows and {"gla", "lolcats", "t2r", "softmax"} <= set(rows)


def test_a_folder_holding_a_bench_of_another_budget_is_an_error(bench, tiny_world, tmp_path, capsys):
    out = tmp_path / "other"
    shutil.copytree(bench["out"], out)
    budget = tmp_path / "more.yaml"
    budget.write_text("base: smoke\nstage2_tokens: 128\n")
    capsys.readouterr()
    args = bench_args(tiny_world, out, bench["recipes"], mixers="gla", budget=str(budget)) + [
        "--ablations",
        "none",
    ]
    assert main(args) == 2
    assert (
        "holds a bench of another model or budget" in capsys.readouterr().err and not (out / "gla").exists()
    )


def test_leaderboard_names_the_devices_of_runs_made_elsewhere(bench):
    from zoo.bench.leaderboard import leaderboard_markdown

    results = copy.deepcopy(bench["results"])
    assert "more than one device" not in leaderboard_markdown(
        results
    )  # every run here, on the bench's device
    for row in results["rows"]:
        if row["name"].startswith("lolcats"):
            row["device"] = "cuda (NVIDIA H100 80GB HBM3)"
        elif row["name"] == "hedgehog":
            row["device"] = None  # a run from before summaries recorded the device
    line = next(x for x in leaderboard_markdown(results).splitlines() if "more than one device" in x)
    assert "cuda (NVIDIA H100 80GB HBM3): lolcats, lolcats [LoRA only]" in line  # not the branch rows
    assert "not recorded: hedgehog" in line and results["device"] + ": softmax" in line


def test_a_data_source_that_cannot_load_stops_the_bench_before_any_run(
    tiny_world, tiny_recipes, tmp_path, capsys
):
    out = tmp_path / "quality"
    args = [*bench_args(tiny_world, out, tiny_recipes), "--set", f"data.eval_ood={json.dumps(['browm'])}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "data.eval_ood" in err and "did you mean 'brown'" in err
    assert not out.exists()


def test_the_leaderboard_leads_with_the_long_context_table_when_the_budget_measures_it(bench):
    from zoo.bench.leaderboard import leaderboard_markdown
    from zoo.long_context import long_context_table

    results = copy.deepcopy(bench["results"])
    assert "## Long context" not in leaderboard_markdown(results)  # the smoke budget does not measure it

    def cells(ppl_1k, ppl_2k):
        return {
            "src": {
                "0-256": {"nll": 3.0, "ppl": 20.0},
                "1024-2048": {"nll": math.log(ppl_1k), "ppl": ppl_1k},
                "2048-4096": {"nll": math.log(ppl_2k), "ppl": ppl_2k},
            }
        }

    rows = rows_by_name(results)
    for name, (a, b) in {"lolcats": (31.0, 32.0), "hedgehog": (45.0, 50.0)}.items():
        rows[name]["long_context"] = long_context_table(
            {"teacher": cells(30.0, 30.0), "free_window": cells(40.0, 42.0), "final": cells(a, b)}, (64, 4)
        )
        rows[name]["passkey_multikey"] = {"1024": 0.25}
    rows["teacher"]["state_bytes_8k_extrapolated"] = 8 * 2**20
    rows["lolcats"]["state_bytes_8k_extrapolated"] = 2**19
    board = leaderboard_markdown(results)
    assert board.index("## Long context") < board.index("## Quality")
    section = board.split("## Long context")[1].split("## Quality")[0]
    assert "first 4 (StreamingLLM, untrained)" in section
    lines = {line.split(" | ")[0][2:]: line for line in section.splitlines() if line.startswith("| ")}
    assert "| ppl src | gap closed src | passkey | multi-key |" in lines[""]
    assert "| 30.00 / 30.00 |" in lines["**teacher**"] and "| 40.00 / 42.00 |" in lines["**free window**"]
    # lolcats: (log 40 - log 31) / (log 40 - log 30) at 1k-2k; hedgehog is worse than the free window (< 0)
    share = (math.log(40) - math.log(31)) / (math.log(40) - math.log(30))
    assert f"| {share:.2f} / " in lines["lolcats"] and "| 0.25 | 512.0 KiB (0.062x) |" in lines["lolcats"]
    assert lines["**teacher**"].endswith("| 8.0 MiB (1.000x) |") and lines["**free window**"].endswith(
        "| - |"
    )
    assert "| -0.41 / -0.52 |" in lines["hedgehog"]


def test_the_long_budget_trains_at_length_and_measures_past_the_window():
    long = BUDGETS["long"]
    overrides = long.recipe_overrides()
    assert overrides["data.seq_len"] >= 1024 and overrides["eval.long_context"] == 4096
    assert overrides["eval.passkey_multikey"] == 4 and max(long.passkey_lengths) == 4096
    # about 20 minutes per mixer on 2 CPU cores, so the leading mixers run in a few hours
    assert 10 * 60 < long.estimate_seconds() < 30 * 60


def test_the_softmax_layers_ablation_keeps_k_evenly_spaced_layers(tiny_world, tiny_recipes, tmp_path, capsys):
    from zoo.bench.quality import plan_bench
    from zoo.preflight import model_facts

    template = load_recipe(tiny_recipes / "bench.yaml")
    layers = model_facts(tiny_world["model"]).num_layers
    args = (tiny_world["model"], ["lolcats", "hedgehog"], BUDGETS["smoke"], tmp_path, ["softmax-layers"], [])
    items = plan_bench(*args, tiny_recipes, template, [], ["lolcats", "gla"])
    added = [it for it in items if it.ablation and it.ablation.startswith("softmax-layers")]
    assert [it.ablation for it in added] == [f"softmax-layers-{k}" for k in (1, 2, 4) if k < layers]
    for it in added:
        k = int(it.ablation.rsplit("-", 1)[1])
        kept = [i for i in range(layers) if i not in it.recipe.mixer.layers]
        assert len(kept) == k and it.mixer == "lolcats" and it.folder.parent.name == "ablations"
        assert it.name == f"lolcats [softmax layers {','.join(map(str, kept))}]"
        assert it.recipe.mixer.options == items[0].recipe.mixer.options  # otherwise the mixer's own run
    assert "softmax-layers ablation of gla skipped" in capsys.readouterr().err
