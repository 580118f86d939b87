"""Generic line plots for bench reports (matplotlib, the Agg backend: no display needed).

line_plot("time_forward.png", {"sdpa": [(1024, 0.1), (2048, 0.4)], "gla": [(1024, 0.05), ...]},
          title="prefill forward", xlabel="context length T", ylabel="seconds")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["line_plot"]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(
    path: str | Path,
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = True,
    logy: bool = True,
    emphasize: Sequence[str] = (),
    note: str | None = None,
) -> Path:
    """One line per series (name -> (x, y) points, drawn in x order; series without points are left
    out), log-log by default. Series named in `emphasize` (e.g. the reference) are drawn thick and black.
    `note` is printed small under the title. Returns the path written (a PNG)."""
    plt = pyplot()
    import matplotlib
    import matplotlib.ticker

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    cmap = matplotlib.colormaps["tab20"]
    colors = [cmap(2 * i) for i in range(10)] + [cmap(2 * i + 1) for i in range(10)]  # distinct hues first
    markers = "os^vD<>pXh*"
    drawn, xs_all = 0, set()
    for i, (name, points) in enumerate(series.items()):
        points = sorted((x, y) for x, y in points if x is not None and y is not None)
        if not points:
            continue
        xs, ys = zip(*points)
        xs_all.update(xs)
        if name in emphasize:
            ax.plot(xs, ys, color="black", linewidth=2.5, marker="o", label=name, zorder=5)
        else:
            ax.plot(
                xs,
                ys,
                color=colors[i % 20],
                linewidth=1.4,
                marker=markers[i % len(markers)],
                markersize=4,
                label=name,
            )
        drawn += 1
    if logx:
        ax.set_xscale("log", base=2)
        if 0 < len(xs_all) <= 12:  # label the measured points in plain numbers, not powers of 2
            ax.set_xticks(sorted(xs_all), [f"{x:g}" for x in sorted(xs_all)])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title if note is None else f"{title}\n{note}", fontsize=11 if note is None else 9)
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, ncol=2 if drawn > 8 else 1, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
