"""Generic helpers for bench reports: Markdown tables, pivots of result records, readable numbers.

Any bench can use them: records are plain dicts (one measurement each), `pivot` arranges one value of
them as a grid (rows by one key, columns by another), and `markdown_table` renders any grid.

    cells = pivot(records, row="name", column="seq_len", value="median_s")
    print(markdown_table(["mixer", *cells.columns], cells.rows_as_text(format_seconds)))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Pivot",
    "c_kernels_line",
    "format_bytes",
    "format_ratio",
    "format_seconds",
    "markdown_table",
    "pivot",
]


def markdown_table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None
) -> str:
    """A GitHub Markdown table. rows: sequences of cells (None renders as "-"); align: one of "l", "r",
    "c" per column (default: the first column left, the others right)."""
    headers = [str(h) for h in headers]
    align = list(align) if align is not None else ["l"] + ["r"] * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} entries for {len(headers)} columns")
    rule = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule[a] for a in align) + "|"]
    for row in rows:
        row = ["-" if cell is None else str(cell).replace("|", "\\|") for cell in row]
        if len(row) != len(headers):
            raise ValueError(f"a row has {len(row)} cells for {len(headers)} columns: {row}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


@dataclass
class Pivot:
    """One value of many records laid out as a grid: values[r][c] for row names `rows` and column keys
    `columns` (None where no record has that pair)."""

    rows: list[Any]
    columns: list[Any]
    values: list[list[Any]]

    def get(self, row: Any, column: Any) -> Any:
        return self.values[self.rows.index(row)][self.columns.index(column)]

    def rows_as_text(self, fmt: Callable[[Any], str] = str) -> list[list[str | None]]:
        """[row name, fmt(value), ...] per row; missing values stay None (rendered "-")."""
        return [
            [str(name), *(None if v is None else fmt(v) for v in vals)]
            for name, vals in zip(self.rows, self.values)
        ]


def pivot(records: Iterable[dict], row: str, column: str, value: str | Callable[[dict], Any]) -> Pivot:
    """Arrange records as a grid: one row per distinct record[row] (first-seen order), one column per
    distinct record[column] (sorted), the cell record[value] (or value(record)). A later record for the
    same cell replaces an earlier one."""
    get = value if callable(value) else (lambda r: r.get(value))
    records = list(records)
    rows = list(dict.fromkeys(r[row] for r in records))
    columns = sorted(dict.fromkeys(r[column] for r in records))
    values = [[None] * len(columns) for _ in rows]
    for r in records:
        values[rows.index(r[row])][columns.index(r[column])] = get(r)
    return Pivot(rows, columns, values)


def format_seconds(s: float | None) -> str:
    """A duration with a unit that keeps 3 significant digits: 12.3 us, 4.56 ms, 7.89 s."""
    if s is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(s) >= scale or unit == "us":
            return f"{s / scale:.3g} {unit}"
    raise AssertionError("unreachable")


def format_bytes(n: float | None) -> str:
    """Bytes in binary units: 512 B, 1.5 KiB, 3.2 MiB, 4.0 GiB."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_ratio(x: float | None) -> str:
    """A speed-up or ratio: 3.14x."""
    return "-" if x is None else f"{x:.3g}x"


def c_kernels_line(status: dict[str, str] | None) -> list[str]:
    """The report line for zoo's CPU C kernels (zoo.kernels.native.status(): name -> "in use" or why not);
    none where the run was not on the CPU (None) or the results predate the record."""
    if not status:
        return []
    used = [name for name, state in status.items() if state == "in use"]
    missing = [f"{name} ({state})" for name, state in status.items() if state != "in use"]
    text = ", ".join(used) if used else "none"
    return [f"- CPU C kernels in use: {text}" + (f"; not in use: {', '.join(missing)}" if missing else "")]
