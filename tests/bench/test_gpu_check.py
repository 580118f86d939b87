"""`zoo bench gpu --dry-run`: every step of the GPU check rehearsed on the CPU at tiny shapes, through the
CLI, so the command a lent GPU runs cannot rot; a failing step is recorded while the others run; the
time budget; the junit counts."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch

from zoo.bench import gpu_check
from zoo.cli import main as cli_main


def dry_run_args(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gpu_check.add_arguments(parser)
    args = parser.parse_args(["--dry-run"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The whole dry run, as `zoo bench gpu --dry-run --out DIR` (about 45 s with one thread)."""
    out = tmp_path_factory.mktemp("gpu-check")
    start = time.monotonic()
    code = cli_main(["bench", "gpu", "--dry-run", "--out", str(out)])
    seconds = time.monotonic() - start
    return code, json.loads((out / "gpu_check.json").read_text()), out, seconds


def test_the_dry_run_records_every_step_ok(dry_run):
    code, record, out, seconds = dry_run
    assert code == 0, json.dumps({k: (s["status"], s["reason"]) for k, s in record["steps"].items()})
    assert record["gpu"] == "cpu (dry run)" and record["dry_run"] is True
    assert record["command"].startswith("zoo bench gpu --out ") and record["command"].endswith("--dry-run")
    assert {"torch", "transformers", "fla"} <= set(record["versions"])
    assert list(record["steps"]) == list(gpu_check.STEPS)
    for name, step in record["steps"].items():
        assert step["status"] == "ok", (name, step["reason"])
        assert step["reason"] is None and 0 < step["seconds"] <= step["cap_seconds"]
    assert seconds < 120  # about 45 s: well inside, but not a benchmark
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# zoo bench gpu: cpu (dry run)")
    for name in gpu_check.STEPS:
        assert f"| {name} | ok |" in md


def test_the_tests_step_counts_the_gpu_tests(dry_run):
    """Two pytest runs, zoo's kernels then flash-linear-attention's (slow to autotune); counts summed."""
    _, record, out, _ = dry_run
    tests = record["steps"]["tests"]["results"]
    counts = {key: tests[key] for key in ("passed", "failed", "errors", "skipped")}
    assert all(isinstance(n, int) and n >= 0 for n in counts.values()), counts
    assert counts["failed"] == 0 and counts["errors"] == 0
    if not torch.cuda.is_available():  # on the CPU every gpu test skips itself
        assert counts["skipped"] > 0 and counts["passed"] == 0
    assert list(tests["runs"]) == [stem for stem, _ in gpu_check.TEST_RUNS]
    summed = {key: 0 for key in counts}
    for stem, run in tests["runs"].items():
        assert "-m gpu" in run["command"] and (out / f"{stem}.log").is_file()
        per_run = gpu_check.junit_counts(out / f"{stem}.xml")
        assert per_run["skipped"] > 0  # each run found gpu tests
        summed = {key: summed[key] + per_run[key] for key in summed}
    assert summed == counts
    assert "--ignore " + gpu_check.FLA_TESTS in tests["runs"]["gpu_tests"]["command"]


def test_the_speed_step_times_sdpa_and_every_mixer(dry_run):
    _, record, out, _ = dry_run
    speed = record["steps"]["speed"]["results"]
    names = {r["name"] for r in speed["records"]}
    assert names == {"sdpa", *gpu_check.SPEED_MIXERS}
    assert {r["mode"] for r in speed["records"]} == {"forward", "forward_backward", "decode"}
    assert [r["seq_len"] for r in speed["records"] if r["name"] == "sdpa"] == [128] * 3 + [
        64
    ] * 3  # 128 first
    assert "--first-seq-len 128" in speed["command"]
    assert all(r["status"] == "ok" for r in speed["records"])
    assert (out / "speed" / "results.json").is_file() and (out / "speed" / "results.md").is_file()


def test_the_train_step_is_killed_resumes_and_finishes(dry_run):
    _, record, out, _ = dry_run
    train = record["steps"]["train"]["results"]
    assert [run["returncode"] for run in train["runs"]] == [-9, 0, 0]
    killed, resumed, finished = train["runs"]
    assert any(line.startswith("zoo: stage2: resuming from step 2/6") for line in resumed["resumed"])
    assert finished["finished_run_found"] and not resumed["finished_run_found"]
    assert (
        train["model_files"] == ["model.safetensors"]
        and (out / "train" / "model" / "model.safetensors").is_file()
    )
    assert train["checkpoints"] == ["stage1", "stage2"]
    assert len(train["losses"]["stage1"]) == 6 and len(train["losses"]["stage2"]) == 6
    assert all(loss == loss for losses in train["losses"].values() for loss in losses)  # no NaN


def test_the_generate_step_has_cells_for_both_models(dry_run):
    _, record, out, _ = dry_run
    cells = record["steps"]["generate"]["results"]["cells"]
    assert {c["model"] for c in cells} == {"teacher", gpu_check.TRAIN_MIXER}
    assert {(c["context"], c["batch"]) for c in cells} == {(32, 1), (32, 2), (64, 1), (64, 2)}
    assert all(c["status"] == "ok" and c["decode_tokens_per_s"] > 0 for c in cells)
    teacher = [c for c in cells if c["model"] == "teacher"]
    assert all(c["context_made_by"].startswith("random KV cache of") for c in teacher)
    assert (out / "generate" / "results.md").is_file()


def test_a_failing_step_is_recorded_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    def boom(check):
        raise RuntimeError("boom: the GPU caught fire")

    def quick(check):
        return {"checked": check.dry_run and check.cap_seconds > 0}

    monkeypatch.setitem(gpu_check.STEP_FUNCTIONS, "tests", boom)
    monkeypatch.setitem(gpu_check.STEP_FUNCTIONS, "train", quick)
    argv = ["bench", "gpu", "--dry-run", "--steps", "tests", "train", "--out", str(tmp_path)]
    assert cli_main(argv) == 1
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = record["steps"]
    assert steps["tests"]["status"] == "failed"
    assert steps["tests"]["reason"] == "RuntimeError: boom: the GPU caught fire"
    assert "Traceback" in steps["tests"]["results"]["traceback"]
    assert steps["train"]["status"] == "ok" and steps["train"]["results"] == {"checked": True}
    assert steps["speed"]["status"] == steps["generate"]["status"] == "skipped"
    assert steps["speed"]["reason"] == "not in --steps"
    assert "| tests | failed |" in (tmp_path / "gpu_check.md").read_text()
    assert "failed steps: tests" in capsys.readouterr().err


def test_steps_after_the_budget_are_skipped(tmp_path, monkeypatch):
    def slow(check):
        time.sleep(0.2)
        return {}

    for name in gpu_check.STEPS:
        monkeypatch.setitem(gpu_check.STEP_FUNCTIONS, name, slow)
    args = dry_run_args(out=str(tmp_path), budget_seconds=0.1)
    record = gpu_check.run_gpu_check(args, log=lambda line: None)
    statuses = [(step["status"], step["reason"]) for step in record["steps"].values()]
    assert statuses == [("ok", None)] + [("skipped", "time budget")] * 3
    assert record["steps"]["tests"]["cap_seconds"] <= 0.1


def test_a_step_past_its_cap_stops_and_keeps_what_it_measured(tmp_path):
    """The speed step runs in process: its progress log stops it once the cap has passed."""
    check = gpu_check.Check(tmp_path, True, None, 0.001, time.monotonic(), lambda line: None)
    with pytest.raises(gpu_check.StepFailed, match="time cap") as caught:
        gpu_check.step_speed(check)
    assert caught.value.results["records"] == []  # stopped inside the first context length


def test_junit_counts(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite tests="7" failures="1" errors="1" skipped="2"/>'
        '<testsuite tests="3" failures="0" errors="0" skipped="1"/></testsuites>'
    )
    assert gpu_check.junit_counts(xml) == {"passed": 5, "failed": 1, "errors": 1, "skipped": 3}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_without_a_gpu_it_asks_for_a_dry_run(tmp_path, capsys):
    assert cli_main(["bench", "gpu", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--dry-run" in err and not (tmp_path / "x").exists()


def test_the_tests_step_stopped_at_its_cap_says_which_tests_ran(tmp_path, monkeypatch):
    """pytest's log is written as it runs, so a run past the cap still names what passed; a run that
    was not reached says so."""
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "tests" / "test_planted.py").write_text(
        "import time\nimport pytest\n\n"
        "@pytest.mark.gpu\ndef test_quick():\n    pass\n\n"
        "@pytest.mark.gpu\ndef test_slow():\n    time.sleep(120)\n"
    )
    monkeypatch.setattr(gpu_check, "TEST_RUNS", (("first", ["tests"]), ("second", ["tests"])))
    out = tmp_path / "out"
    out.mkdir()
    check = gpu_check.Check(out, True, repo, 20.0, time.monotonic() + 20.0, lambda line: None)
    with pytest.raises(gpu_check.StepFailed, match="first: cut at the step's cap") as caught:
        gpu_check.step_tests(check)
    runs = caught.value.results["runs"]
    assert {key: runs["first"][key] for key in ("passed", "failed", "errors", "skipped")} == {
        "passed": 1,
        "failed": 0,
        "errors": 0,
        "skipped": 0,
    }
    assert runs["second"] == {"problem": "not started: the step's cap was reached"}
    assert caught.value.results["passed"] == 1
    assert "test_quick PASSED" in (out / "first.log").read_text()


def test_unknown_speed_mixers_are_refused_before_anything_runs(tmp_path):
    args = dry_run_args(out=str(tmp_path / "x"), speed_mixers=["lolcats", "no-such-mixer"])
    with pytest.raises(ValueError, match="--speed-mixers: unknown mixer.*no-such-mixer"):
        gpu_check.run_gpu_check(args)
    assert not (tmp_path / "x").exists()
