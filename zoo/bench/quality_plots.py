"""PNG plots of a quality bench, drawn from its results rows (see zoo.bench.results):

- quality_vs_params.png: final held-out perplexity against trainable parameters, the references as lines;
- loss_curves_stage2.png: the stage-2 (LoRA) training loss against tokens, per mixer and for the fair
reference;
- decode_vs_context.png: decode time per token against the context, per mixer and for the teacher;
- state_vs_context.png: state bytes per sequence against the context (measured points solid; the
  extrapolation to 32k dashed, where the state's shape allows it).
"""

from __future__ import annotations

from pathlib import Path

from zoo.bench.plots import line_plot, pyplot  # the shared Agg set-up and line plot of the benches

__all__ = ["PLOTS", "spread_labels", "write_plots"]

PLOTS = ("quality_vs_params.png", "loss_curves_stage2.png", "decode_vs_context.png", "state_vs_context.png")


def _colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def _reference(rows: list[dict], name: str) -> dict | None:
    return next((r for r in rows if r["name"] == name and r["status"] == "done"), None)


def spread_labels(anchors: list[tuple[float, float]], gap: float, width: float) -> list[float]:
    """Heights for the labels of points at `anchors` (display units, y up) so that no two labels closer
    than `width` across are closer than `gap` in height: the lower of two stays, the upper moves up.
    Points with nearly the same perplexity and parameter count (retention, liger-gla) stay readable."""
    order = sorted(range(len(anchors)), key=lambda i: (anchors[i][1], anchors[i][0]))
    heights = [y for _, y in anchors]
    placed: list[int] = []
    for i in order:
        x = anchors[i][0]
        for j in placed:  # the placed labels are below: push this one over each it would touch
            if abs(anchors[j][0] - x) < width and heights[i] < heights[j] + gap:
                heights[i] = heights[j] + gap
        placed.append(i)
        placed.sort(key=lambda j: heights[j])
    return heights


def _quality_vs_params(plt, rows: list[dict], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    points = [
        r
        for r in rows
        if r["kind"] != "reference"
        and r["trainable_params"]
        and r["ppl_heldout"]
        and r["ablation"] not in ("window-branch", "linear-branch")
    ]
    for r, color in zip(points, _colors(len(points))):
        marker = "x" if r["kind"] == "ablation" else "o"
        ax.scatter(r["trainable_params"], r["ppl_heldout"], color=color, marker=marker, zorder=3)
    for name, style in (("teacher", "--"), ("teacher + LoRA", ":")):
        ref = _reference(rows, name)
        if ref and ref["ppl_heldout"]:
            ax.axhline(
                ref["ppl_heldout"],
                color="black",
                linestyle=style,
                linewidth=1,
                label=f"{name}: {ref['ppl_heldout']:.2f}",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    fig.canvas.draw()  # fixes the limits, so data map to display points
    anchors = [tuple(ax.transData.transform((r["trainable_params"], r["ppl_heldout"]))) for r in points]
    pixels_per_point = fig.dpi / 72
    heights = spread_labels(anchors, gap=9 * pixels_per_point, width=90 * pixels_per_point)
    for r, (_, y), height in zip(points, anchors, heights):
        ax.annotate(
            r["name"],
            (r["trainable_params"], r["ppl_heldout"]),
            fontsize=7,
            xytext=(3, 3 + (height - y) / pixels_per_point),
            textcoords="offset points",
        )
    ax.set_xlabel("trainable parameters (stage 1 + stage 2)")
    ax.set_ylabel("held-out perplexity after stage 2")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _loss_curves(rows: list[dict], path: Path, title: str) -> None:
    series = {
        r["name"]: r["loss_curve_stage2"] for r in rows if r["loss_curve_stage2"] and r["kind"] != "reference"
    }
    ref = _reference(rows, "teacher + LoRA")
    if ref and ref["loss_curve_stage2"]:
        series["teacher + LoRA (fair ref.)"] = ref["loss_curve_stage2"]
    line_plot(
        path,
        series,
        title=title,
        xlabel="stage-2 training tokens",
        ylabel="next-token loss (nats)",
        logx=False,
        logy=False,
        emphasize=["teacher + LoRA (fair ref.)"],
    )


def _measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["decode_by_context"] and r["kind"] in ("mixer", "reference")]


def _decode_time(rows: list[dict], path: Path, title: str) -> None:
    series = {
        r["name"]: [(int(c), v["decode_ms_per_token"]) for c, v in r["decode_by_context"].items()]
        for r in _measured(rows)
    }
    line_plot(
        path,
        series,
        title=title,
        xlabel="context (tokens)",
        ylabel="decode time per token (ms), batch 1",
        logy=False,
        emphasize=["teacher"],
    )


def _state(plt, rows: list[dict], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    measured = _measured(rows)
    for r, color in zip(measured, _colors(len(measured))):
        contexts = sorted(r["decode_by_context"], key=int)
        x = [int(c) for c in contexts]
        state = [r["decode_by_context"][c]["state_bytes"] / 2**20 for c in contexts]
        ax.plot(x, state, marker="o", color=color, label=r["name"])
        if r["state_bytes_32k_extrapolated"] is not None:
            ax.plot(
                [x[-1], 32_768],
                [state[-1], r["state_bytes_32k_extrapolated"] / 2**20],
                linestyle="--",
                color=color,
            )
    ax.set_xlabel("context (tokens); dashed: extrapolated to 32k")
    ax.set_ylabel("state per sequence (MiB)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(rows: list[dict], out: Path, title: str) -> list[Path]:
    """Draw the plots (PLOTS) into `out`; returns their paths."""
    plt = pyplot()
    paths = [out / name for name in PLOTS]
    _quality_vs_params(plt, rows, paths[0], title)
    _loss_curves(rows, paths[1], f"stage 2 (LoRA) loss, {title}")
    _decode_time(rows, paths[2], f"decode time per token, {title}")
    _state(plt, rows, paths[3], f"state per sequence, {title}")
    return paths
