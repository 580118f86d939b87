"""`zoo bench speed` on tiny shapes: every output file and field, the CLI path, skips and bad input."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch

from zoo.bench import speed, timing
from zoo.bench.report import format_bytes, format_seconds, markdown_table, pivot
from zoo.bench.speed_report import plot_names, write_report
from zoo.cli import main as cli_main
from zoo.kernels import native

TINY = [
    "--heads",
    "2",
    "--kv-heads",
    "1",
    "--head-dim",
    "16",
    "--hidden",
    "32",
    "--seq-lens",
    "32",
    "64",
    "--repeats",
    "1",
    "--decode-steps",
    "2",
    "--threads",
    "1",
]
MIXERS = ["gla", "lolcats"]
RECORD_FIELDS = {
    "name",
    "kind",
    "family",
    "backend",
    "mode",
    "seq_len",
    "status",
    "note",
    "times_s",
    "median_s",
    "min_s",
    "tokens_per_s",
    "peak_memory_bytes",
    "state_bytes",
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    speed.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    threads = torch.get_num_threads()
    try:
        results = speed.run_bench(
            parse(["--mixers", *MIXERS, *TINY, "--out", str(out)]), log=lambda line: None
        )
    finally:
        torch.set_num_threads(threads)
    write_report(results, out)
    return results, out


def test_every_case_mode_and_length_is_measured(bench):
    results, _ = bench
    names = [c["name"] for c in results["cases"]]
    assert names == ["sdpa", *MIXERS]
    assert {(r["name"], r["mode"], r["seq_len"]) for r in results["results"]} == {
        (n, m, T) for n in names for m in speed.MODES for T in (32, 64)
    }
    for r in results["results"]:
        assert set(r) == RECORD_FIELDS
        assert r["status"] == "ok", r
        assert len(r["times_s"]) == 1 and r["median_s"] > 0 and r["min_s"] > 0 and r["tokens_per_s"] > 0
        assert r["peak_memory_bytes"] is not None and r["peak_memory_bytes"] >= 0
        if r["mode"] in ("forward", "decode"):
            assert r["state_bytes"] > 0
    by = {(r["name"], r["mode"], r["seq_len"]): r for r in results["results"]}
    # the KV cache grows with the context; a linear mixer's state does not
    assert by["sdpa", "forward", 64]["state_bytes"] == 2 * by["sdpa", "forward", 32]["state_bytes"]
    assert by["gla", "forward", 64]["state_bytes"] == by["gla", "forward", 32]["state_bytes"]
    assert by["sdpa", "forward", 32]["state_bytes"] == 2 * 1 * 32 * 16 * 4  # k and v: Hkv * T * D fp32


def test_results_json_has_the_conditions(bench):
    results, out = bench
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(results["results"]))
    for key in (
        "command",
        "argv",
        "created",
        "device",
        "threads",
        "dtype",
        "shape",
        "seq_lens",
        "repeats",
        "warmup",
        "decode_steps",
        "max_seconds",
        "modes",
        "reference",
        "cases",
        "memory_method",
        "cpu_allocator",
        "cpu_c_kernels",
        "versions",
    ):
        assert key in on_disk, key
    assert set(on_disk["cpu_c_kernels"]) == {path.stem for path in native.SOURCES.glob("*.c")}
    assert on_disk["device"]["type"] == "cpu" and on_disk["device"]["name"]
    assert on_disk["dtype"] == "float32" and on_disk["threads"] == 1
    assert on_disk["shape"] == {"batch": 1, "heads": 2, "kv_heads": 1, "head_dim": 16, "hidden": 32}
    assert on_disk["versions"]["torch"] == torch.__version__
    assert on_disk["command"].startswith("zoo bench speed --mixers gla lolcats --seq-lens 32 64")
    # the recorded command parses back to the same options
    again = speed._resolve(parse(on_disk["command"].split()[3:]))
    assert again.mixers == MIXERS and again.seq_lens == [32, 64] and again.heads == 2


def test_markdown_and_plots(bench):
    results, out = bench
    md = (out / "results.md").read_text()
    assert results["command"] in md
    assert "CPU C kernels in use" in md
    for what in speed.MODES.values():
        assert f"## {what}: median time" in md and f"### {what}: speed-up against sdpa" in md
    assert "## state / KV-cache bytes per sequence" in md and "peak memory" in md
    assert "| mixer | T=32 | T=64 |" in md
    assert md.count("| gla |") >= 7 and md.count("| sdpa |") >= 5  # sdpa has no speed-up rows
    for name in plot_names(results):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_cli_path(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "bench",
        "speed",
        "--mixers",
        "hedgehog",
        *TINY,
        "--seq-lens",
        "16",
        "--modes",
        "forward",
        "decode",
        "--out",
        str(out),
    ]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "hedgehog" in printed and "results.md" in printed
    results = json.loads((out / "results.json").read_text())
    assert {(r["name"], r["mode"]) for r in results["results"]} == {
        (n, m) for n in ("sdpa", "hedgehog") for m in ("forward", "decode")
    }
    assert {p.name for p in out.iterdir()} >= {
        "results.json",
        "results.md",
        "time_forward.png",
        "time_decode.png",
        "state_bytes.png",
    }


def test_time_guard_skips_with_a_note(tmp_path):
    args = parse(
        [
            "--mixers",
            "linear-elu",
            *TINY,
            "--seq-lens",
            "16",
            "32",
            "--max-seconds",
            "1e-9",
            "--modes",
            "forward",
            "--out",
            str(tmp_path),
        ]
    )
    results = speed.run_bench(args, log=lambda line: None)
    rows = {(r["name"], r["seq_len"]): r for r in results["results"]}
    assert rows["sdpa", 16]["status"] == "ok" and "one run only" in rows["sdpa", 16]["note"]
    assert rows["sdpa", 32]["status"] == "skipped" and "--max-seconds" in rows["sdpa", 32]["note"]
    assert "## notes" in write_report(results, tmp_path)[0].read_text()


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["bench", "speed", "--mixers", "no-such-mixer", "--out", str(tmp_path)]) == 2
    assert "unknown mixer 'no-such-mixer'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="multiple of --kv-heads"):
        speed._resolve(parse(["--heads", "3", "--kv-heads", "2"]))
    with pytest.raises(ValueError, match="--repeats"):
        speed._resolve(parse(["--repeats", "0"]))
    with pytest.raises(ValueError, match="--first-seq-len 300 is not one of --seq-lens"):
        speed._resolve(parse(["--seq-lens", "64", "128", "--first-seq-len", "300"]))


def test_a_first_length_is_measured_before_the_rest():
    assert speed.run_order([4096, 16384, 32768], 16384) == [16384, 4096, 32768]
    assert speed.run_order([128, 64], None) == [64, 128]


def test_report_helpers_are_generic():
    records = [
        {"who": "a", "n": 2, "t": 0.5},
        {"who": "b", "n": 1, "t": 2e-3},
        {"who": "a", "n": 1, "t": 1.5},
    ]
    grid = pivot(records, row="who", column="n", value="t")
    assert grid.rows == ["a", "b"] and grid.columns == [1, 2] and grid.get("b", 2) is None
    table = markdown_table(["who", "n=1", "n=2"], grid.rows_as_text(format_seconds))
    assert table.splitlines() == [
        "| who | n=1 | n=2 |",
        "|:---|---:|---:|",
        "| a | 1.5 s | 500 ms |",
        "| b | 2 ms | - |",
    ]
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(100) == "100 B"
    with pytest.raises(ValueError, match="cells"):
        markdown_table(["a", "b"], [["only one"]])


def test_decode_only_builds_the_state_untimed(tmp_path):
    args = parse(
        ["--mixers", "retention", *TINY, "--seq-lens", "16", "--modes", "decode", "--out", str(tmp_path)]
    )
    results = speed.run_bench(args, log=lambda line: None)
    assert [(r["name"], r["mode"], r["status"]) for r in results["results"]] == [
        ("sdpa", "decode", "ok"),
        ("retention", "decode", "ok"),
    ]
    assert all(r["state_bytes"] > 0 for r in results["results"])


class _FakeCase:
    name, kind, family, backend = "fake", "mixer", "fake", "torch"


@pytest.mark.parametrize("always_slow", [False, True])
def test_a_slow_first_cuda_call_is_run_again_before_timing(monkeypatch, always_slow):
    """On CUDA a first call that compiles kernels is not taken for the shape's speed: one more untimed call
    decides. Only when that one is slow too does the measurement stop at one run."""
    monkeypatch.setattr(speed, "synchronize", lambda device: None)
    monkeypatch.setattr(timing, "synchronize", lambda device: None)
    monkeypatch.setattr(speed, "measure_peak", lambda fn, device: (fn(), 0))
    calls = []

    def fn():
        calls.append(1)
        if len(calls) == 1 or always_slow:
            time.sleep(0.25)

    args = argparse.Namespace(max_seconds=0.1, warmup=1, repeats=3, batch=1)
    guard = speed.SlowCaseGuard(args.max_seconds)
    rec, _ = speed.measure_case(_FakeCase(), "forward", 64, fn, args, torch.device("cuda"), guard)
    assert rec["status"] == "ok" and rec["note"].startswith("first call 0.2")
    if always_slow:
        assert len(calls) == 2 and rec["times_s"] == [pytest.approx(rec["median_s"])]
        assert rec["median_s"] >= 0.25 and "one run only" in rec["note"]
    else:
        assert len(calls) == 5 and rec["median_s"] < 0.1 and "one run only" not in rec["note"]


def test_a_slow_first_cpu_call_is_the_measurement(monkeypatch):
    """On the CPU nothing compiles on a first call: a slow one is the shape's speed, run once."""
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.25 if len(calls) == 1 else 0)

    args = argparse.Namespace(max_seconds=0.1, warmup=1, repeats=3, batch=1)
    guard = speed.SlowCaseGuard(args.max_seconds)
    rec, _ = speed.measure_case(_FakeCase(), "forward", 64, fn, args, torch.device("cpu"), guard)
    assert len(calls) == 1 and rec["median_s"] >= 0.25 and rec["note"].startswith("one run only")


def test_each_cpu_case_starts_from_a_released_heap(monkeypatch):
    """On the CPU the heap's free memory is given back before each case's warm-up (and only then), so a
    case does not run on memory the cases before it left idle; on CUDA nothing is released."""
    events = []
    monkeypatch.setattr(speed, "release_free_memory", lambda: events.append("release"))
    monkeypatch.setattr(speed, "synchronize", lambda device: None)
    monkeypatch.setattr(timing, "synchronize", lambda device: None)
    monkeypatch.setattr(speed, "measure_peak", lambda fn, device: (fn(), 0))
    args = argparse.Namespace(max_seconds=10.0, warmup=2, repeats=3, batch=1)
    guard = speed.SlowCaseGuard(args.max_seconds)
    for device in ("cpu", "cuda"):
        speed.measure_case(
            _FakeCase(), "forward", 64, lambda: events.append("call"), args, torch.device(device), guard
        )
    assert events == ["release"] + ["call"] * 5 + ["call"] * 5


def test_a_mixer_named_twice_is_timed_once():
    args = speed._resolve(parse(["--mixers", "hedgehog,gla", "hedgehog", "gla,"]))
    assert args.mixers == ["hedgehog", "gla"]
