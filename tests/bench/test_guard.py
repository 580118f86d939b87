"""`zoo bench guard`: speed-ups from records, verdicts against a baseline (with the measurement replaced by
fixed speed-ups: fast and deterministic), refusals of bad input, and one real --tiny record and compare."""

from __future__ import annotations

import json

import pytest
import torch

from zoo.bench import guard
from zoo.bench.speed_report import speedups
from zoo.cli import main as cli_main

MIXERS = guard.TINY_CONFIG["mixers"]
MODES = guard.TINY_CONFIG["modes"]
T = guard.TINY_CONFIG["seq_lens"][0]


def record(name: str, mode: str, median_s: float | None, status: str = "ok", note: str | None = None) -> dict:
    return {"name": name, "mode": mode, "seq_len": T, "status": status, "median_s": median_s, "note": note}


def fake_results(table: dict[str, dict[str, float]], failed: tuple[tuple[str, str], ...] = ()) -> dict:
    """A speed bench's results in which SDPA takes 1 s and each mixer 1 / its speed-up in `table`."""
    records = [record("sdpa", mode, 1.0) for mode in MODES]
    for mixer, per_mode in table.items():
        records += [record(mixer, mode, 1.0 / x) for mode, x in per_mode.items()]
    records += [record(m, mode, None, "error", "RuntimeError: boom") for m, mode in failed]
    return {
        "command": "zoo bench speed (fake)",
        "device": {"type": "cpu", "name": "test cpu"},
        "threads": torch.get_num_threads(),
        "env": {},
        "versions": {"torch": torch.__version__},
        "reference": "sdpa",
        "results": records,
    }


def speedup_table(x: float = 2.0) -> dict[str, dict[str, float]]:
    return {m: {mode: x + 0.1 * i for mode in MODES} for i, m in enumerate(MIXERS)}


@pytest.fixture
def fake_measure(monkeypatch):
    """Replace the speed bench with fixed results; returns the holder of the next results to return."""
    state = {"results": fake_results(speedup_table()), "calls": 0}

    def measure(config, out, log=print):
        assert config == guard.TINY_CONFIG
        state["calls"] += 1
        return state["results"]

    monkeypatch.setattr(guard, "measure", measure)
    return state


def run(tmp_path, *args: str) -> int:
    return cli_main(["bench", "guard", "--tiny", "--out", str(tmp_path / "out"), *args])


def verdicts(tmp_path) -> dict[tuple[str, str], str]:
    report = json.loads((tmp_path / "out" / "guard.json").read_text())
    return {(e["mixer"], e["mode"]): e["verdict"] for e in report["entries"]}


def test_speedup_is_sdpa_time_over_the_mixer_time_and_skips_failures():
    records = [
        record("sdpa", "forward", 2.0),
        record("gla", "forward", 0.5),
        record("hedgehog", "forward", None, "error", "RuntimeError: boom"),
        record("sdpa", "forward_backward", None, "skipped", "out of memory"),
        record("gla", "forward_backward", 1.0),  # its reference failed: no speed-up
    ]
    assert speedups(records, "sdpa") == {("gla", "forward", T): 4.0}
    assert guard.guard_speedups({"reference": "sdpa", "results": records}) == {"gla": {"forward": 4.0}}


def test_config_is_speed_arguments():
    argv = guard.speed_argv(guard.GUARD_CONFIG, "out")
    assert argv[argv.index("--seq-lens") + 1] == "4096"
    assert argv[argv.index("--modes") + 1 : argv.index("--modes") + 3] == ["forward", "forward_backward"]
    assert "--threads" not in argv  # torch's default, recorded with the results
    assert guard.default_baseline().parts[-2:] == ("docs", "speed-guard.json")


def test_record_then_compare_passes(tmp_path, fake_measure, capsys):
    baseline = tmp_path / "base.json"
    assert run(tmp_path, "--record", "--baseline", str(baseline)) == 0
    saved = json.loads(baseline.read_text())
    assert saved["kind"] == guard.BASELINE_KIND and saved["config"] == guard.TINY_CONFIG
    assert saved["speedups"]["gla"]["forward"] == pytest.approx(2.1)
    assert {"machine", "threads", "torch", "created", "command"} <= set(saved)
    assert run(tmp_path, "--baseline", str(baseline)) == 0
    assert set(verdicts(tmp_path).values()) == {"ok"}
    out = capsys.readouterr().out
    assert "| gla | forward | 2.1x | 2.1x | 1.00 | ok |" in out and "PASS: 16 ok" in out
    assert (tmp_path / "out" / "guard.md").read_text().count("| ok |") == len(MIXERS) * len(MODES)


def test_inflated_baseline_regresses_and_a_missing_entry_is_new(tmp_path, fake_measure, capsys):
    baseline = tmp_path / "base.json"
    assert run(tmp_path, "--record", "--baseline", str(baseline)) == 0
    saved = json.loads(baseline.read_text())
    saved["speedups"]["gla"]["forward"] = 2.1 / 0.5  # measured 2.1x: 0.5 of it, below 0.6
    saved["speedups"]["delta"]["forward"] = 2.3 / 0.65  # 0.65 of it: within the tolerance
    del saved["speedups"]["liger"]
    baseline.write_text(json.dumps(saved))
    assert run(tmp_path, "--baseline", str(baseline)) == 1
    got = verdicts(tmp_path)
    assert got.pop(("gla", "forward")) == "regressed"
    assert got.pop(("liger", "forward")) == got.pop(("liger", "forward_backward")) == "new"
    assert set(got.values()) == {"ok"}
    assert "FAIL: 13 ok, 1 regressed, 2 new (gla forward)" in capsys.readouterr().out
    assert run(tmp_path, "--baseline", str(baseline), "--tolerance", "0.55") == 0  # 0.5 > 0.45


def test_a_failed_measurement_fails_and_is_never_recorded(tmp_path, fake_measure):
    table = speedup_table()
    del table["mamba2"]["forward"]
    fake_measure["results"] = fake_results(table, failed=(("mamba2", "forward"),))
    baseline = tmp_path / "base.json"
    assert run(tmp_path, "--record", "--baseline", str(baseline)) == 1
    assert not baseline.exists()
    fake_measure["results"] = fake_results(speedup_table())
    assert run(tmp_path, "--record", "--baseline", str(baseline)) == 0
    fake_measure["results"] = fake_results(table, failed=(("mamba2", "forward"),))
    assert run(tmp_path, "--baseline", str(baseline)) == 1
    report = json.loads((tmp_path / "out" / "guard.json").read_text())
    (entry,) = [e for e in report["entries"] if e["verdict"] != "ok"]
    assert (entry["mixer"], entry["mode"], entry["verdict"]) == ("mamba2", "forward", "failed")
    assert "boom" in entry["note"]


@pytest.mark.parametrize("content", ['{"kind": "something else", "speedups": {}}', "not json at all"])
def test_record_refuses_a_file_that_is_not_a_guard_baseline(tmp_path, fake_measure, capsys, content):
    foreign = tmp_path / "foreign.json"
    foreign.write_text(content)
    assert run(tmp_path, "--record", "--baseline", str(foreign)) == 2
    assert foreign.read_text() == content
    assert fake_measure["calls"] == 0  # refused before anything was timed
    err = capsys.readouterr().err.strip()
    assert err.startswith("zoo: error:") and "not a zoo bench guard baseline" in err and "\n" not in err


def test_bad_input_exits_2_before_timing(tmp_path, fake_measure):
    assert run(tmp_path, "--baseline", str(tmp_path / "missing.json")) == 2
    assert run(tmp_path, "--tolerance", "1.5") == 2
    full = tmp_path / "full.json"  # a baseline of the full configuration does not compare to a tiny run
    full.write_text(json.dumps({"kind": guard.BASELINE_KIND, "config": guard.GUARD_CONFIG, "speedups": {}}))
    assert run(tmp_path, "--baseline", str(full)) == 2
    assert fake_measure["calls"] == 0


def test_tiny_end_to_end(tmp_path):
    """The real speed bench at tiny shapes: record, then compare (loose tolerance: tiny timings are noise)."""
    baseline = tmp_path / "base.json"
    assert run(tmp_path, "--record", "--baseline", str(baseline)) == 0
    assert set(json.loads(baseline.read_text())["speedups"]) == set(MIXERS)
    assert run(tmp_path, "--baseline", str(baseline), "--tolerance", "0.9") == 0
    out = tmp_path / "out"
    assert {"results.json", "results.md", "guard.json", "guard.md"} <= {p.name for p in out.iterdir()}
    assert set(verdicts(tmp_path).values()) == {"ok"}
