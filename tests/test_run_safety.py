"""The run folder is a safe place: nothing of the user's lost, one writer at a time, a finished run stays
finished, changes redo only what they touch, bad input is one line before anything heavy loads."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from zoo_testing import RECIPE, ForkedZoo, tiny_overrides, zoo_subprocess

from zoo.cli import main
from zoo.run_folder import claim_run_folder


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path_factory.getbasetemp() / "zoo-cache"))


@pytest.fixture
def no_teacher(monkeypatch):
    """Fails the test if the teacher (or any model) starts to load: the checks must come first."""

    def boom(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the recipe was checked")

    import zoo.teacher

    monkeypatch.setattr(zoo, "load_teacher", boom)  # first: zoo's lazy attribute must be read unpatched
    monkeypatch.setattr(zoo.teacher, "load_teacher", boom)


@pytest.fixture(scope="module")
def finished(tiny_world, tmp_path_factory):
    """One finished tiny run, copied by each test that changes it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    os.environ["ZOO_CACHE"] = str(tmp_path_factory.getbasetemp() / "zoo-cache")
    try:
        assert main(["run", RECIPE, *tiny_overrides(tiny_world), "--out", str(out)]) == 0
    finally:
        del os.environ["ZOO_CACHE"]
    return out


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".zoo-lock"))
    return dst


def run(world, out, *extra, redo=(), **overrides):
    args = ["run", RECIPE, *tiny_overrides(world, **overrides), *extra, "--out", str(out)]
    for stage in redo:
        args += ["--redo", stage]
    return main(args)


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ the user's files


def test_out_into_a_foreign_folder_is_refused_and_nothing_is_touched(
    tiny_world, tmp_path, capsys, no_teacher
):
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "model" / "important.txt").write_text("keep me")
    assert run(tiny_world, out) == 2
    err = capsys.readouterr().err
    assert "not empty and was not made by zoo" in err and "model/" in err
    assert sorted(p.name for p in out.iterdir()) == ["model"]
    assert (out / "model" / "important.txt").read_text() == "keep me"


def test_a_file_put_into_a_runs_model_folder_is_never_deleted(finished, tmp_path, tiny_world, capsys):
    out = copy_run(finished, tmp_path / "run")
    (out / "model" / "important.txt").write_text("keep me")
    assert run(tiny_world, out, redo=["eval"]) == 2
    assert "important.txt" in capsys.readouterr().err
    assert (out / "model" / "important.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------ a finished run


def test_a_finished_run_reports_its_summary_without_loading_anything(
    finished, tmp_path, tiny_world, capsys, no_teacher
):
    out = copy_run(finished, tmp_path / "run")
    before = (out / "model" / "model.safetensors").read_bytes()
    assert run(tiny_world, out) == 0
    captured = capsys.readouterr()
    assert "is a finished run" in captured.err and "final (stage 2)" in captured.out
    assert (out / "model" / "model.safetensors").read_bytes() == before


def test_a_corrupt_checkpoint_is_named_with_the_command_that_redoes_its_stage(
    finished, tmp_path, tiny_world, capsys
):
    out = copy_run(finished, tmp_path / "run")
    ckpt = out / "checkpoints" / "stage1" / "trainable.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-4096:] = b"\xff" * 4096  # same size, other bytes
    ckpt.write_bytes(bytes(data))
    model_before = (out / "model" / "model.safetensors").read_bytes()
    assert run(tiny_world, out, redo=["eval"]) == 2
    err = capsys.readouterr().err
    assert "zoo: error:" in err and str(ckpt) in err and "checksum mismatch" in err
    assert f"zoo run {out} --redo stage1" in err
    assert (out / "model" / "model.safetensors").read_bytes() == model_before  # nothing was rewritten
    assert run(tiny_world, out, redo=["stage1"]) == 0  # the command it named
    assert "superseded" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert all(
        v == v for v in load_file(str(out / "model" / "model.safetensors"))["lm_head.weight"].flatten()[:8]
    )
    assert summary["ppl_final"]["heldout"] < 1e4


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda d: (d / "trainable.safetensors").write_bytes(
                (d / "trainable.safetensors").read_bytes()[:100]
            ),
            "size",
        ),
        (lambda d: (d / "trainer.json").write_text(""), "trainer.json"),
    ],
)
def test_a_damaged_checkpoint_without_checksums_names_the_file(
    finished, tmp_path, tiny_world, capsys, damage, message
):
    out = copy_run(finished, tmp_path / "run")
    ckpt = out / "checkpoints" / "stage2"
    damage(ckpt)
    assert run(tiny_world, out, redo=["eval"]) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and message in err and "--redo stage2" in err
    (ckpt / "zoo-checksums.json").unlink()  # an older zoo's checkpoint: the files themselves must be named
    assert run(tiny_world, out, redo=["eval"]) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "unreadable" in err and "Traceback" not in err


def test_non_finite_checkpoint_weights_are_an_error(finished, tmp_path, tiny_world, capsys):
    from safetensors.torch import save_file

    out = copy_run(finished, tmp_path / "run")
    ckpt = out / "checkpoints" / "stage1"
    weights = load_file(str(ckpt / "trainable.safetensors"))
    name = next(iter(weights))
    weights[name][0] = float("nan")
    save_file(weights, str(ckpt / "trainable.safetensors"))
    (ckpt / "zoo-checksums.json").unlink()
    assert run(tiny_world, out, redo=["eval"]) == 2
    assert "non-finite weights" in capsys.readouterr().err


# ------------------------------------------------------------------------------ one writer


def test_a_second_run_into_a_busy_folder_is_refused_naming_the_first(
    tiny_world, tmp_path, capsys, no_teacher
):
    out = tmp_path / "run"
    holder = claim_run_folder(out)  # another run, as far as the lock can tell (its own open file)
    try:
        assert run(tiny_world, out) == 2
        err = capsys.readouterr().err
        assert "in use by another zoo run" in err and f"pid {os.getpid()}" in err
    finally:
        holder.release()


def test_two_runs_started_together_one_refuses(tiny_world, tmp_path):
    out = tmp_path / "run"
    zoo_cli = ForkedZoo(tmp_path / "logs")
    args = ["run", RECIPE, *tiny_overrides(tiny_world), "--out", str(out)]
    started = [zoo_cli.start(args, {"OMP_NUM_THREADS": "1"}) for _ in range(2)]
    for proc, _ in started:
        proc.join(600)
    results = [(proc.exitcode, log.read_text()) for proc, log in started]
    assert sorted(code for code, _ in results) == [0, 2], [log[-1500:] for _, log in results]
    assert any("in use by another zoo run" in log for _, log in results)
    steps = [(r["stage"], r["step"]) for r in metrics_rows(out)]
    assert len(steps) == len(set(steps))


# ------------------------------------------------------------------------------ changes redo what they touch


def test_a_stage2_change_after_the_nan_guard_keeps_stage1(tiny_world, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny_world, out, **{"stage2.lr": 1e30}) == 2
    assert "Lower the learning rate" in capsys.readouterr().err
    assert (out / "checkpoints" / "stage1").is_dir()
    assert run(tiny_world, out, **{"stage2.lr": 3e-4}) == 0  # the guard's advice, as written
    err = capsys.readouterr().err
    assert "stage2.lr" in err and "stage1: resuming from step 6/6" in err
    rows = [(r["stage"], r["step"]) for r in metrics_rows(out)]
    assert rows.count(("stage1", 1)) == 1 and [s for st, s in rows if st == "stage2"] == list(range(1, 7))


def test_an_eval_change_to_a_finished_run_redoes_only_that_measure(finished, tmp_path, tiny_world, capsys):
    out = copy_run(finished, tmp_path / "run")
    before = json.loads((out / "progress.json").read_text())
    assert run(tiny_world, out, **{"eval.generation_prompts": 2}) == 0
    err = capsys.readouterr().err
    assert "eval.generation_prompts" in err and "redoing generation" in err
    after = json.loads((out / "progress.json").read_text())
    for key in ("teacher", "swap", "stage1", "stage1_train", "stage2_train", "final"):
        assert after[key] == before[key], key
    assert after["generation"]["final"]["prompts"] == 2
    aside = list((out / "superseded").iterdir())
    assert len(aside) == 1 and (aside[0] / "summary.json").exists() and (aside[0] / "progress.json").exists()


def test_another_model_or_mixer_is_another_run(finished, tmp_path, tiny_world, capsys, no_teacher):
    out = copy_run(finished, tmp_path / "run")
    assert run(tiny_world, out, mixer="linear-elu") == 2
    assert "holds a run of another recipe (mixer.name differ)" in capsys.readouterr().err


def test_a_run_folder_as_recipe_continues_that_run(finished, tmp_path, capsys, no_teacher):
    out = copy_run(finished, tmp_path / "run")
    assert main(["run", str(out)]) == 0
    assert "is a finished run" in capsys.readouterr().err


# ------------------------------------------------------------------------------ data


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("data.train", "nothere.txt", "'nothere.txt' is not an embedded source"),
        ("data.eval_ood", "browm", "did you mean 'brown'"),
    ],
)
def test_a_data_source_that_cannot_load_is_an_error(
    tiny_world, tmp_path, capsys, no_teacher, key, value, message
):
    specs = [tiny_world["train" if key == "data.train" else "ood"], value]
    out = tmp_path / "run"
    assert run(tiny_world, out, **{key: specs}) == 2
    err = capsys.readouterr().err
    assert key in err and message in err and "data.skip_unavailable" in err
    assert not out.exists()


def test_skip_unavailable_makes_a_missing_source_a_warning(tiny_world):
    from zoo.preflight import check_data
    from zoo.recipe import load_recipe

    recipe = load_recipe(
        RECIPE,
        tiny_overrides(
            tiny_world, **{"data.eval_ood": [tiny_world["ood"], "browm"], "data.skip_unavailable": True}
        ),
    )
    (warning,) = check_data(recipe)
    assert "browm" in warning and "skipping" in warning


# ------------------------------------------------------------------------------ one line, early


def _gpt2_folder(tmp_path: Path) -> str:
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    return str(folder)


@pytest.mark.parametrize(
    "case",
    [
        "unknown mixer",
        "bad option",
        "bad layers",
        "gpt2",
        "missing model",
        "out is a file",
        "out under a file",
        "recipe is a folder",
    ],
)
def test_bad_input_is_one_line_before_the_teacher_loads(tiny_world, tmp_path, capsys, no_teacher, case):
    out = tmp_path / "run"
    extra = {
        "unknown mixer": {"mixer": "nope"},
        "bad option": {"mixer.options": {"feature_dim": -3}},
        "bad layers": {"mixer.layers": [0, 7]},
        "gpt2": {"model.name": _gpt2_folder(tmp_path)},
        "missing model": {"model.name": str(tmp_path / "no-such-model")},
    }.get(case, {})
    if case == "out is a file":
        out.write_text("x")
    if case == "out under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    if case == "recipe is a folder":
        code = main(["run", str(tmp_path), "--out", str(out)])
    else:
        code = run(tiny_world, out, **extra)
    assert code == 2
    err = capsys.readouterr().err
    expected = {
        "unknown mixer": "unknown mixer 'nope'",
        "bad option": "feature_dim",
        "bad layers": "out of range",
        "gpt2": "'gpt2' model, which zoo cannot convert",
        "missing model": "no model folder at",
        "out is a file": "is a file",
        "out under a file": "is a file",
        "recipe is a folder": "folder without recipe.yaml",
    }[case]
    assert expected in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("zoo: error:")]) == 1
    if case not in ("out is a file", "out under a file"):
        assert not out.exists()  # nothing left behind: the corrected command runs into the same folder


def test_a_read_only_out_folder_is_one_line(tiny_world, tmp_path, capsys, monkeypatch, no_teacher):
    out = tmp_path / "ro" / "run"
    (tmp_path / "ro").mkdir()
    if os.geteuid() == 0:  # root writes anywhere: let os.access say what a user would see
        real = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path / "ro" else real(p, mode)
        )
    else:
        (tmp_path / "ro").chmod(0o555)
    assert run(tiny_world, out) == 2
    assert "no permission to write" in capsys.readouterr().err


def test_a_binary_recipe_names_the_file(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(bytes(range(256)))
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert str(recipe) in err and "not UTF-8" in err


def test_a_full_disk_at_a_checkpoint_is_one_line(tiny_world, tmp_path, capsys, monkeypatch):
    import errno

    import zoo.transfer.loop as loop

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(loop, "save_file", full)
    assert run(tiny_world, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "free some space" in err and "Traceback" not in err


def test_an_unexpected_exception_is_a_bug_with_its_traceback(monkeypatch, capsys):
    import zoo.cli

    def broken(args):
        raise TypeError("an internal slip")

    monkeypatch.setattr(zoo.cli, "cmd_list", broken)
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "an internal slip" in err and "this is a bug in zoo" in err


def test_a_bad_recipe_fails_in_seconds_in_a_fresh_process(tiny_world, tmp_path):
    start = time.perf_counter()
    result = zoo_subprocess(
        ["run", RECIPE, *tiny_overrides(tiny_world, mixer="nope"), "--out", str(tmp_path / "r")]
    )
    seconds = time.perf_counter() - start
    assert result.returncode == 2 and "unknown mixer 'nope'" in result.stderr
    assert seconds < 10, f"a bad recipe took {seconds:.1f} s to fail"
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------ housekeeping


def test_files_follow_the_umask(finished):
    for path in (
        finished / "summary.json",
        finished / "progress.json",
        finished / "model" / "model.safetensors",
    ):
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path  # readable by others under umask 022
    assert stat.S_IMODE((finished / "model").stat().st_mode) & 0o055 == 0o055


def test_stage1_worse_than_the_swap_is_flagged():
    from zoo.summary import stage1_worse_than_swap

    progress = {"swap": {"heldout": {"ppl": 40.0}}, "stage1": {"heldout": {"ppl": 55.0}}}
    assert "stage 1 ended worse than the untrained swap" in stage1_worse_than_swap(progress)
    progress["stage1"]["heldout"]["ppl"] = 30.0
    assert stage1_worse_than_swap(progress) is None


@pytest.mark.parametrize("kill_at", ["write:model", "swap:stage1:4"])
def test_a_kill_mid_swap_leaves_no_litter_and_loses_no_step(tiny_world, tmp_path, kill_at):
    args = ["run", RECIPE, *tiny_overrides(tiny_world), "--out", str(tmp_path / "run")]
    zoo_cli = ForkedZoo(tmp_path / "logs")
    code, log = zoo_cli.run(args, {"ZOO_FAULT_KILL_AT": kill_at, "OMP_NUM_THREADS": "1"})
    assert code == -9, log[-2000:]
    code, log = zoo_cli.run(args, {"OMP_NUM_THREADS": "1"})
    assert code == 0, log[-2000:]
    if kill_at.startswith("swap:stage1"):
        assert "stage1: resuming from step 2/6" in log
    out = tmp_path / "run"
    assert not [p for p in out.rglob("*") if p.name.startswith((".zoo-tmp.", ".zoo-old."))]
    steps = [(r["stage"], r["step"]) for r in metrics_rows(out)]
    assert len(steps) == len(set(steps)) == 12


def test_a_source_in_both_training_and_out_of_domain_data_is_refused(tiny_world):
    from zoo.preflight import check_data
    from zoo.recipe import RecipeError, load_recipe

    recipe = load_recipe(RECIPE, tiny_overrides(tiny_world, **{"data.eval_ood": [tiny_world["train"]]}))
    with pytest.raises(RecipeError, match="never trained on"):
        check_data(recipe)
