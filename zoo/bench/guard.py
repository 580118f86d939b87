"""`zoo bench guard`: a speed regression guard, each mixer's speed-up against SDPA checked against a
recorded baseline.

It runs `zoo bench speed` (zoo.bench.speed.run_bench) with one fixed configuration, GUARD_CONFIG (the CPU,
float32, Llama-3-8B's layer shape, T = 4,096, prefill forward and forward + backward, the median of 3 runs,
the mixers the speed targets name; under 5 minutes on 2 CPU cores), and takes for each (mixer, mode) the
speed-up SDPA's median seconds / the mixer's at the same context length and mode
(zoo.bench.speed_report.speedups). Speed-ups, not seconds, are compared: a ratio against softmax attention
timed in the same run cancels much of a machine's and a moment's speed. An entry regresses when its speed-up
is below (1 - tolerance) x the recorded one; the default tolerance, 40%, sits above what one speed-up varied
between two runs in a row on this project's quiet 2-core CPU (0.75x to 1.65x: docs/benchmarks.md),
so a halved speed-up fails and the machine's noise does not.

- compare (the default): against the baseline (default docs/speed-guard.json in the checkout, or
  --baseline). Verdicts: ok, regressed, new (not in the baseline: no failure) and failed (the measurement
  or SDPA's failed or was skipped). Exit 0 when nothing regressed or failed, 1 otherwise, 2 for bad input.
- --record: write the measured speed-ups as the baseline instead, with the machine, threads, versions,
  date, GUARD_CONFIG and the command. A file there that is not a guard baseline (its "kind" is not
  "zoo-speed-guard") is never overwritten, and nothing is recorded unless every entry was measured.

--out DIR gets the speed bench's own outputs (results.json, results.md, plots) plus guard.json (measured
speed-ups, the baseline's, each entry's verdict) and guard.md (the table and a one-line summary), which
are also printed. --tiny swaps in tiny shapes (TINY_CONFIG), for the tests only: its speed-ups say
nothing about real speed, and a baseline records which configuration it holds, so a tiny run is refused
against a full baseline and the other way round.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
from pathlib import Path

__all__ = [
    "BASELINE_KIND",
    "GUARD_CONFIG",
    "TINY_CONFIG",
    "add_arguments",
    "compare",
    "default_baseline",
    "guard_speedups",
    "main",
    "measure",
    "speed_argv",
]

#: the "kind" of a baseline file: --record overwrites only a file that carries it
BASELINE_KIND = "zoo-speed-guard"
#: the "kind" of DIR/guard.json (a result, not a baseline: --record refuses to overwrite it too)
RESULT_KIND = "zoo-speed-guard-result"
BASELINE_FORMAT = 1

#: what the guard runs: `zoo bench speed` options by their argparse names (a list: several values; None:
#: speed's default, here torch's own thread count, recorded with the results). Options not named
#: (batch, warm-up, --max-seconds, ...) take speed's defaults; the resolved speed command is recorded too.
GUARD_CONFIG = {
    "device": "cpu",
    "dtype": "float32",
    "heads": 32,
    "kv_heads": 8,
    "head_dim": 128,
    "hidden": 4096,
    "seq_lens": [4096],
    "modes": ["forward", "forward_backward"],
    "repeats": 3,
    "mixers": ["hedgehog", "gla", "mamba2", "delta", "gated-delta", "lolcats", "lolcats-terraced", "liger"],
    "backends": "auto",
    "threads": None,
}
#: --tiny (tests only): the same mixers and modes at tiny shapes, one timed run
TINY_CONFIG = {
    **GUARD_CONFIG,
    "heads": 4,
    "kv_heads": 2,
    "head_dim": 16,
    "hidden": 64,
    "seq_lens": [64],
    "repeats": 1,
}
#: config keys a baseline may differ in from the run (a mixer or mode added is a "new" entry; repeats
#: changes the noise, not what is measured); any other difference makes the comparison meaningless
_MAY_DIFFER = ("mixers", "modes", "repeats")
VERDICTS = ("ok", "regressed", "new", "failed", "recorded")


def default_baseline() -> Path:
    """docs/speed-guard.json of the checkout zoo is imported from (the folder above the zoo package)."""
    return Path(__file__).resolve().parents[2] / "docs" / "speed-guard.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--baseline",
        default=None,
        help=f"the recorded baseline JSON (default: {default_baseline()})",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.4,
        help="an entry regresses when its speed-up is below (1 - tolerance) x the recorded one "
        "(default 0.4: one speed-up varied from 0.75x to 1.65x between two runs in a row on a 2-core CPU)",
    )
    parser.add_argument(
        "--record",
        action="store_true",
        help="write the measured speed-ups as the baseline instead of comparing (never over a file "
        "that is not a guard baseline)",
    )
    parser.add_argument("--out", default="bench-guard-cpu", help="output folder (default: bench-guard-cpu)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="for the tests only: tiny shapes (4 heads, 2 KV heads, head dim 16, hidden 64, T=64, one "
        "run); its speed-ups say nothing about real speed",
    )


# ---------------------------------------------------------------------------------------------------


def speed_argv(config: dict, out: str | Path) -> list[str]:
    """`config` (GUARD_CONFIG's form) as `zoo bench speed` arguments writing to `out`."""
    argv = []
    for key, value in config.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return [*argv, "--out", str(out)]


def measure(config: dict, out: Path, log=print) -> dict:
    """Run the speed bench with `config` into `out` (results.json, results.md, plots); return its results
    dict (zoo.bench.speed.run_bench's). Its Namespace comes from speed's own parser, so every option the
    config leaves out keeps speed's default."""
    from zoo.bench import speed
    from zoo.bench.speed_report import write_report

    parser = argparse.ArgumentParser()
    speed.add_arguments(parser)
    results = speed.run_bench(parser.parse_args(speed_argv(config, out)), log=log)
    write_report(results, out)
    return results


def guard_speedups(results: dict) -> dict[str, dict[str, float]]:
    """{mixer: {mode: speed-up against the reference}} of a speed bench's results (one context length);
    measurements that failed or were skipped, or whose reference measurement did, have no entry."""
    from zoo.bench.speed_report import speedups

    table: dict[str, dict[str, float]] = {}
    for (name, mode, _), x in speedups(results["results"], results["reference"]).items():
        table.setdefault(name, {})[mode] = x
    return table


def _failure_notes(results: dict) -> dict[tuple[str, str], str]:
    """(name, mode) -> why, for the measurements that did not succeed (the reference's included)."""
    return {
        (r["name"], r["mode"]): f"{r['status']}: {r['note']}" if r["note"] else r["status"]
        for r in results["results"]
        if r["status"] != "ok"
    }


def compare(
    config: dict,
    measured: dict[str, dict[str, float]],
    recorded: dict[str, dict[str, float]] | None,
    tolerance: float,
    notes: dict[tuple[str, str], str] | None = None,
    reference: str = "sdpa",
) -> list[dict]:
    """One entry per (mixer, mode) of `config`: recorded and measured speed-ups, their ratio, the
    threshold (1 - tolerance) x recorded, and the verdict: failed (nothing measured), new (nothing
    recorded; None `recorded`: recording), regressed (below the threshold) or ok."""
    notes = notes or {}
    entries = []
    for mixer in config["mixers"]:
        for mode in config["modes"]:
            x = measured.get(mixer, {}).get(mode)
            old = None if recorded is None else recorded.get(mixer, {}).get(mode)
            entry = {"mixer": mixer, "mode": mode, "recorded": old, "measured": x}
            entry["ratio"] = x / old if x is not None and old else None
            entry["threshold"] = (1 - tolerance) * old if old is not None else None
            if x is None:
                if (mixer, mode) in notes:
                    why = notes[(mixer, mode)]
                elif (reference, mode) in notes:
                    why = f"{reference} {notes[(reference, mode)]}"
                else:
                    why = "not measured"
                entry.update(verdict="failed", note=why)
            elif old is None:
                entry.update(verdict="new" if recorded is not None else "recorded", note=None)
            elif x < entry["threshold"]:
                entry.update(verdict="regressed", note=None)
            else:
                entry.update(verdict="ok", note=None)
            entries.append(entry)
    return entries


# ---------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a zoo bench guard baseline (not JSON: {err})") from None


def _is_baseline(obj: object) -> bool:
    return isinstance(obj, dict) and obj.get("kind") == BASELINE_KIND


def _check_record_target(path: Path) -> None:
    """--record writes `path` only if it is missing or a guard baseline already."""
    if path.is_dir():
        raise ValueError(f"--baseline {path} is a folder: give the JSON file to record into")
    if path.exists() and not _is_baseline(_read_json(path)):
        raise ValueError(
            f'{path} is not a zoo bench guard baseline (no "kind": "{BASELINE_KIND}"): refusing to '
            "overwrite it; give another --baseline"
        )


def _load_baseline(path: Path, config: dict) -> dict:
    """The baseline at `path`, checked to be one and recorded with a configuration `config` compares to."""
    if not path.is_file():
        raise ValueError(
            f"no baseline at {path}: record one with `zoo bench guard --record`"
            + ("" if path == default_baseline() else f" --baseline {path}")
        )
    baseline = _read_json(path)
    if not _is_baseline(baseline):
        raise ValueError(f'{path} is not a zoo bench guard baseline (no "kind": "{BASELINE_KIND}")')
    if not isinstance(baseline.get("speedups"), dict) or not isinstance(baseline.get("config"), dict):
        raise ValueError(f'{path}: a guard baseline without "speedups" or "config"')
    ours = json.loads(json.dumps(config))
    differ = sorted(
        key
        for key in set(ours) | set(baseline["config"])
        if key not in _MAY_DIFFER and ours.get(key) != baseline["config"].get(key)
    )
    if differ:
        what = "; ".join(f"{k}: {baseline['config'].get(k)!r} there, {ours.get(k)!r} here" for k in differ)
        raise ValueError(
            f"{path} was recorded with another configuration ({what}); its speed-ups do not compare: "
            "record again with --record"
        )
    return baseline


def _validate(args: argparse.Namespace) -> None:
    if not 0 <= args.tolerance < 1:
        raise ValueError(f"--tolerance must be in [0, 1), got {args.tolerance}")


def command_line(args: argparse.Namespace) -> str:
    """This run as one `zoo bench guard` command."""
    parts = ["zoo", "bench", "guard"]
    if args.tiny:
        parts.append("--tiny")
    if args.record:
        parts.append("--record")
    if args.baseline is not None:
        parts += ["--baseline", str(args.baseline)]
    if not args.record:
        parts += ["--tolerance", f"{args.tolerance:g}"]
    return shlex.join([*parts, "--out", str(args.out)])


def _conditions(results: dict, config: dict) -> dict:
    """Where and how the speed-ups were measured."""
    import torch

    from zoo.bench.speed import device_name

    return {
        "machine": results.get("device", {}).get("name") or device_name(torch.device(config["device"])),
        "threads": results.get("threads", torch.get_num_threads()),
        "env": results.get("env", {}),
        "torch": results.get("versions", {}).get("torch", torch.__version__),
        "versions": results.get("versions", {}),
    }


def _warnings(baseline: dict, conditions: dict) -> list[str]:
    """Differences between the baseline's conditions and this run's that make speed-ups less comparable."""
    out = []
    for key, what in (("machine", "machine"), ("threads", "torch threads"), ("torch", "torch version")):
        if baseline.get(key) != conditions.get(key):
            out.append(
                f"the baseline was recorded with {what} {baseline.get(key)!r}, this run has "
                f"{conditions.get(key)!r}: speed-ups may not compare"
            )
    return out


def _median_seconds(results: dict) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for r in results["results"]:
        if r["status"] == "ok":
            table.setdefault(r["name"], {})[r["mode"]] = r["median_s"]
    return table


# ---------------------------------------------------------------------------------------------------


def _ratio_text(x: float | None) -> str | None:
    from zoo.bench.report import format_ratio

    return None if x is None else format_ratio(x)


def guard_table(entries: list[dict]) -> str:
    """The Markdown table of `entries`: mixer, mode, recorded and measured speed-ups, their ratio, verdict."""
    from zoo.bench.report import markdown_table

    rows = []
    for e in entries:
        verdict = e["verdict"] if not e.get("note") else f"{e['verdict']} ({e['note']})"
        change = None if e["ratio"] is None else f"{e['ratio']:.2f}"
        rows.append(
            [e["mixer"], e["mode"], _ratio_text(e["recorded"]), _ratio_text(e["measured"]), change, verdict]
        )
    headers = ["mixer", "mode", "recorded x", "measured x", "measured / recorded", "verdict"]
    return markdown_table(headers, rows, align="llrrrl")


def summary_line(entries: list[dict], tolerance: float, record: bool) -> str:
    """One line: passed or failed (recorded or not), the count of each verdict, the entries that failed."""
    counts = {v: sum(e["verdict"] == v for e in entries) for v in VERDICTS}
    bad = [f"{e['mixer']} {e['mode']}" for e in entries if e["verdict"] in ("regressed", "failed")]
    verdicts = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    if record:
        head = "NOT RECORDED: every entry must be measured" if bad else "RECORDED"
        return f"{head}: {verdicts}" + (f" ({', '.join(bad)})" if bad else "")
    return (
        f"{'FAIL' if bad else 'PASS'}: {verdicts}"
        + (f" ({', '.join(bad)})" if bad else "")
        + f"; regressed means a speed-up below {1 - tolerance:g} x the recorded one"
    )


def _baseline_file(args, config: dict, results: dict, conditions: dict, measured: dict, created: str) -> dict:
    return {
        "kind": BASELINE_KIND,
        "format": BASELINE_FORMAT,
        "created": created,
        "command": command_line(args),
        **conditions,
        "tiny": args.tiny,
        "config": config,
        "speed_command": results.get("command"),
        "reference": results.get("reference", "sdpa"),
        "speedups": measured,
        "median_s": _median_seconds(results),
    }


def _markdown(report: dict, table: str) -> str:
    """guard.md from guard.json's dict: the command, the baseline's and this run's conditions, warnings,
    the table, the summary."""
    baseline, where = report["baseline"], ""
    if baseline is not None:
        where = (
            f" (recorded {baseline['created']} on {baseline['machine']}, torch threads {baseline['threads']})"
        )
    return "\n".join(
        [
            "# zoo bench guard",
            "",
            "```",
            report["command"],
            "```",
            "",
            f"- baseline: {report['baseline_path']}{where}",
            f"- this run: {report['machine']}, torch threads {report['threads']}, torch {report['torch']}; "
            "the speed bench's own tables are in results.md beside this file",
            f"- speed-up: SDPA's median seconds / the mixer's at T={report['config']['seq_lens'][0]}, same "
            "mode; above 1 is faster",
            *(f"- WARNING: {w}" for w in report["warnings"]),
            "",
            table,
            report["summary"],
            "",
        ]
    )


def main(args: argparse.Namespace) -> int:
    from zoo.atomic import atomic_file, write_json

    _validate(args)
    config = TINY_CONFIG if args.tiny else GUARD_CONFIG
    path = Path(args.baseline) if args.baseline is not None else default_baseline()
    # bad input is found before minutes of timing
    if args.record:
        _check_record_target(path)
        baseline = None
    else:
        baseline = _load_baseline(path, config)
    out = Path(args.out)
    print(f"zoo bench guard: {'recording' if args.record else 'comparing with'} {path}; writing to {out}")
    results = measure(config, out, log=lambda line: print(line, flush=True))
    measured = guard_speedups(results)
    conditions = _conditions(results, config)
    recorded = None if baseline is None else baseline["speedups"]
    reference = results.get("reference", "sdpa")
    entries = compare(config, measured, recorded, args.tolerance, _failure_notes(results), reference)
    failed = any(e["verdict"] in ("regressed", "failed") for e in entries)
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if args.record and not failed:
        _check_record_target(path)  # again: a file may have appeared there during the run
        write_json(path, _baseline_file(args, config, results, conditions, measured, created))
    keys = ("created", "command", "machine", "threads", "torch", "tiny")
    baseline_info = None if baseline is None else {k: baseline.get(k) for k in keys}
    report = {
        "kind": RESULT_KIND,
        "created": created,
        "command": command_line(args),
        **conditions,
        "tiny": args.tiny,
        "config": config,
        "speed_command": results.get("command"),
        "record": args.record,
        "baseline_path": str(path),
        "baseline": baseline_info,
        "tolerance": args.tolerance,
        "measured": measured,
        "entries": entries,
        "warnings": [] if baseline is None else _warnings(baseline, conditions),
        "summary": summary_line(entries, args.tolerance, args.record),
        "passed": not failed,
    }
    write_json(out / "guard.json", report)
    table = guard_table(entries)
    with atomic_file(out / "guard.md") as f:
        f.write(_markdown(report, table))
    print()
    for w in report["warnings"]:
        print(f"WARNING: {w}")
    print(table)
    print(report["summary"])
    return 1 if failed else 0
