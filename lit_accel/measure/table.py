"""The one Markdown table renderer of ``lit-accel tune``, the benchmarks and ``tools/gpu_check.py``."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["cell", "markdown_table"]


def cell(value: float | None, pattern: str = "{:,.0f}") -> str:
    """``pattern.format(value)``, or ``—`` for a figure that is missing (None or NaN).

    Example::

        cell(1234.5) == "1,234"; cell(float("nan")) == "—"; cell(0.123, "{:.1%}") == "12.3%"
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return pattern.format(value)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; a column name ending in ``:`` is right-aligned (a number), the ``:`` dropped.

    A ``|`` inside a cell is written as ``/`` (it would split the cell).

    Raises:
        ValueError: a row has another number of cells than there are columns.

    Example::

        markdown_table(["variant", "images/s:"], [["plain", "1,200"]])
    """
    names = [c[:-1] if c.endswith(":") else c for c in columns]
    aligns = ["---:" if c.endswith(":") else "---" for c in columns]
    lines = ["| " + " | ".join(names) + " |", "| " + " | ".join(aligns) + " |"]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"row {list(row)!r} has {len(row)} cells: the table has {len(columns)} columns")
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
    return "\n".join(lines)
