"""results.md and PNG plots of a speed bench (zoo.bench.speed), drawn from its results dict.

results.md: the conditions (command, device, dtype, shapes, threads, versions, how memory was measured),
then per mode a table of median times (rows: mixer, columns: context length T) and one of speed-ups
against SDPA (SDPA's time / the mixer's: above 1 is faster), state / KV-cache bytes, peak memory, and
the notes of skipped or failed measurements. Plots: time_<mode>.png (time against T, log-log) and
state_bytes.png.
"""

from __future__ import annotations

from pathlib import Path

from zoo.atomic import atomic_file
from zoo.bench.plots import line_plot
from zoo.bench.report import (
    c_kernels_line,
    format_bytes,
    format_ratio,
    format_seconds,
    markdown_table,
    pivot,
)

__all__ = ["plot_names", "results_markdown", "speedups", "write_report"]

_STATUS_TEXT = {"skipped": "skipped", "error": "error"}


def plot_names(results: dict) -> list[str]:
    return [f"time_{mode}.png" for mode in results["modes"]] + ["state_bytes.png"]


def _records(results: dict, mode: str) -> list[dict]:
    order = {c["name"]: i for i, c in enumerate(results["cases"])}
    return sorted(
        (r for r in results["results"] if r["mode"] == mode), key=lambda r: order.get(r["name"], 1e9)
    )


def _cell(fmt):
    def render(r: dict | None) -> str | None:
        if r is None:
            return None
        return fmt(r) if r["status"] == "ok" else _STATUS_TEXT.get(r["status"], r["status"])

    return render


def _grid(records: list[dict], render) -> tuple[list, list[list]]:
    grid = pivot(records, row="name", column="seq_len", value=lambda r: r)
    return grid.columns, [[name, *(render(r) for r in row)] for name, row in zip(grid.rows, grid.values)]


def speedups(records: list[dict], reference: str) -> dict[tuple[str, str, int], float]:
    """The speed-up of each measurement against the reference's (SDPA's) at the same mode and context
    length: the reference's median seconds / the record's, keyed (name, mode, seq_len); above 1 is faster.
    Only records with status "ok" and a median count: a failed or skipped record, or one whose reference
    measurement failed or was skipped, has no entry."""
    ref = {
        (r["mode"], r["seq_len"]): r["median_s"]
        for r in records
        if r["name"] == reference and r["status"] == "ok" and r["median_s"]
    }
    out = {}
    for r in records:
        base = ref.get((r["mode"], r["seq_len"]))
        if r["name"] != reference and r["status"] == "ok" and r["median_s"] and base:
            out[(r["name"], r["mode"], r["seq_len"])] = base / r["median_s"]
    return out


def _speedups(records: list[dict], reference: str) -> tuple[list, list[list]]:
    values = speedups(records, reference)

    def ratio(r: dict) -> str:
        x = values.get((r["name"], r["mode"], r["seq_len"]))
        return "-" if x is None else format_ratio(x)

    return _grid([r for r in records if r["name"] != reference], _cell(ratio))


def _header(results: dict) -> list[str]:
    shape = results["shape"]
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    env = ", ".join(f"{k}={v}" for k, v in results["env"].items() if v is not None) or "none set"
    return [
        "# zoo bench speed",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"- device: {results['device']['name']} ({results['device']['type']}), torch threads "
        f"{results['threads']} "
        f"(env: {env})",
        f"- dtype {results['dtype']}; batch {shape['batch']}, {shape['heads']} query heads, "
        f"{shape['kv_heads']} "
        f"key/value heads, head dim {shape['head_dim']}, hidden {shape['hidden']}",
        f"- {results['warmup']} warm-up run(s), then the median of {results['repeats']} timed run(s); "
        "decode: "
        f"{results['decode_steps']} steps per timed run, each from the state after T tokens",
        f"- peak memory: {results['memory_method']}",
        f"- CPU allocator: {results['cpu_allocator']}",
        *c_kernels_line(results.get("cpu_c_kernels")),
        f"- versions: {versions}; created {results['created']}",
        "",
    ]


def results_markdown(results: dict) -> str:
    ref = results["reference"]
    lines = _header(results)
    for mode, what in results["modes"].items():
        records = _records(results, mode)
        if not records:
            continue
        unit = "per token" if mode == "decode" else "per call"
        cols, rows = _grid(records, _cell(lambda r: format_seconds(r["median_s"])))
        lines += [
            f"## {what}: median time {unit}",
            "",
            markdown_table(["mixer", *[f"T={t}" for t in cols]], rows),
        ]
        cols, rows = _speedups(records, ref)
        lines += [
            f"### {what}: speed-up against {ref} ({ref}'s time / the mixer's; above 1 is faster)",
            "",
            markdown_table(["mixer", *[f"T={t}" for t in cols]], rows),
        ]
    for mode, what in results["modes"].items():
        records = _records(results, mode)
        if records:
            cols, rows = _grid(records, _cell(lambda r: format_bytes(r["peak_memory_bytes"])))
            lines += [
                f"## peak memory, {what}",
                "",
                markdown_table(["mixer", *[f"T={t}" for t in cols]], rows),
            ]
    states = _state_records(results)
    if states:
        cols, rows = _grid(states, lambda r: format_bytes(r["state_bytes"]))
        lines += [
            "## state / KV-cache bytes per sequence after T tokens",
            "",
            markdown_table(["mixer", *[f"T={t}" for t in cols]], rows),
        ]
    notes = [r for r in results["results"] if r["note"]]
    if notes:
        lines += (
            ["## notes", ""]
            + [f"- {r['name']}, {r['mode']}, T={r['seq_len']}: {r['note']}" for r in notes]
            + [""]
        )
    return "\n".join(lines)


def _state_records(results: dict) -> list[dict]:
    """The records that carry the state bytes: forward's, or decode's when forward was not timed."""
    records = _records(results, "forward") or _records(results, "decode")
    return [r for r in records if r["state_bytes"] is not None]


def _series(records: list[dict], key: str) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        series.setdefault(r["name"], [])
        if r["status"] == "ok" and r[key] is not None:
            series[r["name"]].append((r["seq_len"], r[key]))
    return series


def write_report(results: dict, out_dir: Path) -> list[Path]:
    """Write results.md and the plots into out_dir (results.json is written by the bench itself)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "results.md"
    with atomic_file(md) as f:
        f.write(results_markdown(results))
    shape = results["shape"]
    note = (
        f"{results['device']['name']}, {results['dtype']}, B={shape['batch']}, H={shape['heads']}/"
        f"{shape['kv_heads']}, D={shape['head_dim']}"
    )
    baselines = [c["name"] for c in results["cases"] if c["kind"] == "attention"]
    paths = [md]
    for mode, what in results["modes"].items():
        paths.append(
            line_plot(
                out_dir / f"time_{mode}.png",
                _series(_records(results, mode), "median_s"),
                title=f"{what}: time against context length",
                xlabel="context length T (tokens)",
                ylabel="seconds per token" if mode == "decode" else "seconds per call",
                emphasize=baselines,
                note=note,
            )
        )
    paths.append(
        line_plot(
            out_dir / "state_bytes.png",
            _series(_state_records(results), "state_bytes"),
            title="state / KV-cache bytes per sequence",
            xlabel="context length T (tokens)",
            ylabel="bytes",
            emphasize=baselines,
            note=note,
        )
    )
    return paths
