"""The report's table cells: one way to print a number, an interval and a table."""

from __future__ import annotations

from dataclasses import dataclass


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def interval(value, low, high, *, digits: int = 3, sign: bool = False) -> str:
    """``value (low–high)``; ``value (no CI)`` when the interval is missing; ``–`` if none."""
    if value is None:
        return "–"
    f = f"{{:+.{digits}f}}" if sign else f"{{:.{digits}f}}"
    if low is None or high is None:
        return f.format(value) + " (no CI)"
    return f"{f.format(value)} ({f.format(low)} to {f.format(high)})"


@dataclass(frozen=True)
class Row:
    cells: list
    cls: str = ""


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[Row]


def table(headers: list[str], rows: list[list], row_class=None) -> Table:
    return Table(headers, [Row(r, (row_class(i) or "") if row_class else "")
                           for i, r in enumerate(rows)])
