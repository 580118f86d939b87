"""The report of `zoo bench generate` from its results: results.md (decode tokens/s by model x context and
batch, the linearized/teacher ratio of best tokens/s per context, peak memory, how each context was made,
the cells that did not run) and one plot of tokens/s against batch per context (where matplotlib is
importable)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from zoo.atomic import atomic_file

__all__ = ["plot_name", "results_markdown", "write_report"]


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _cell_text(cell: dict) -> str:
    if cell["status"] == "ok":
        return _rate(cell["decode_tokens_per_s"])
    return {"oom": "OOM", "skipped": "skip"}.get(cell["status"], cell["status"])


def _best(cells: list[dict]) -> dict | None:
    ran = [c for c in cells if c["status"] == "ok"]
    return max(ran, key=lambda c: c["decode_tokens_per_s"]) if ran else None


def _ratio_lines(results: dict) -> list[str]:
    cells = results["cells"]
    teachers = [m["name"] for m in results["models"] if m["kind"] == "teacher"]
    linearized = [m["name"] for m in results["models"] if m["kind"] == "linearized"]
    lines = []
    for context in results["contexts"]:
        at = [c for c in cells if c["context"] == context]
        teacher = _best([c for c in at if c["model"] in teachers])
        for name in linearized:
            best = _best([c for c in at if c["model"] == name])
            if best is None or teacher is None:
                who = name if best is None else "the teacher"
                lines.append(f"- C={context}: {name}: no ratio ({who} ran at no batch)")
                continue
            ratio = best["decode_tokens_per_s"] / teacher["decode_tokens_per_s"]
            lines.append(
                f"- C={context}: {name} {_rate(best['decode_tokens_per_s'])} tok/s (B={best['batch']}) / "
                f"teacher {_rate(teacher['decode_tokens_per_s'])} tok/s (B={teacher['batch']}) = {ratio:.3g}x"
            )
    return lines


def _grid(results: dict, render: Callable[[dict], str | None]) -> list[list[str | None]]:
    rows = []
    for model in results["models"]:
        for context in results["contexts"]:
            by_batch = {
                c["batch"]: c
                for c in results["cells"]
                if c["model"] == model["name"] and c["context"] == context
            }
            rows.append([model["name"], str(context), *(render(by_batch[b]) for b in results["batches"])])
    return rows


def results_markdown(results: dict, plot_note: str | None = None) -> str:
    """The report: decode tokens/s by model x context and batch, the linearized/teacher ratios, peak
    memory, how each context was made, and why any cell did not run."""
    from zoo.bench.report import c_kernels_line, format_bytes, markdown_table

    headers = ["model", "context", *(f"B={b}" for b in results["batches"])]
    versions = results["versions"]
    parts = [
        f"# zoo bench generate: {results['model']}\n",
        f"{results['device']['name']}, {results['dtype']}, {results['threads']} threads, torch "
        f"{versions.get('torch')}, transformers {versions.get('transformers')}. Context fill: "
        f"{results['context_fill']} ({results['context_fill_means']}); {results['new_tokens']} new "
        f"tokens per sequence, timed after {results.get('warmup_steps', 0)} untimed step(s); the teacher's "
        f"cache: {results['teacher_cache']}.\n",
        *(line + "\n" for line in c_kernels_line(results.get("cpu_c_kernels"))),
        f"```\n{results['command']}\n```\n",
        "## Decode tokens/s (batch x new tokens / decode seconds)\n",
        markdown_table(headers, _grid(results, _cell_text)),
        "## Linearized over teacher: best tokens/s at any batch that ran\n",
        "\n".join(_ratio_lines(results)) + "\n",
        f"## Peak memory ({results['memory_method']})\n",
        markdown_table(
            headers,
            _grid(results, lambda c: format_bytes(c["peak_memory_bytes"]) if c["status"] == "ok" else None),
        ),
        "## How each context was made\n",
    ]
    made = {}
    for c in results["cells"]:
        if c["context_made_by"]:
            made.setdefault((c["model"], c["context_made_by"]), []).append(str(c["context"]))
    parts.append(
        "\n".join(f"- {model} (C={', '.join(dict.fromkeys(cs))}): {how}" for (model, how), cs in made.items())
        + "\n"
    )
    steps = {}
    for c in results["cells"]:
        if c.get("decode_step"):  # results written before zoo.lean_decode have none
            steps.setdefault((c["model"], c["decode_step"]), []).append(f"C={c['context']} B={c['batch']}")
    if steps:
        parts.append("## Which forward decoded\n")
        parts.append(
            "\n".join(f"- {model}: {step} ({', '.join(at)})" for (model, step), at in steps.items()) + "\n"
        )
    not_run = [c for c in results["cells"] if c["status"] != "ok"]
    if not_run:
        parts.append("## Cells that did not run\n")
        parts.append(
            "\n".join(
                f"- {c['model']} C={c['context']} B={c['batch']}: {c['status']}: {c['reason']}"
                for c in not_run
            )
            + "\n"
        )
    if plot_note:
        parts.append(f"{plot_note}\n")
    return "\n".join(parts)


def plot_name(context: int) -> str:
    """The file name of the plot at context `context`."""
    return f"decode_tokens_per_s_C{context}.png"


def write_report(results: dict, out_dir: str | Path) -> list[Path]:
    """Write results.md and, where matplotlib is importable, one plot of tokens/s against batch per
    context (results.json is written by the bench itself). Returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    plot_note = None
    if importlib.util.find_spec("matplotlib") is None:
        plot_note = "No plots: matplotlib is not importable."
    else:
        from zoo.bench.plots import line_plot

        teachers = [m["name"] for m in results["models"] if m["kind"] == "teacher"]
        note = f"{results['device']['name']}, {results['dtype']}, {results['context_fill']} context"
        for context in results["contexts"]:
            series = {
                m["name"]: [
                    (c["batch"], c["decode_tokens_per_s"])
                    for c in results["cells"]
                    if c["model"] == m["name"] and c["context"] == context and c["status"] == "ok"
                ]
                for m in results["models"]
            }
            paths.append(
                line_plot(
                    out_dir / plot_name(context),
                    series,
                    title=f"greedy decoding at context {context}: tokens/s against batch",
                    xlabel="batch B (sequences)",
                    ylabel="decode tokens/s",
                    emphasize=teachers,
                    note=note,
                )
            )
    md = out_dir / "results.md"
    with atomic_file(md) as f:
        f.write(results_markdown(results, plot_note))
    return [md, *paths]
