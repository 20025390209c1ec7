"""How `moderation bench` prints numbers: aligned tables and milliseconds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns separated by two spaces, numbers right-aligned, a dashed rule under the headers."""
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str], numeric: bool) -> str:
        parts = []
        for i, (cell, width) in enumerate(zip(row, widths, strict=True)):
            right = numeric and i > 0 and _looks_numeric(cell)
            parts.append(cell.rjust(width) if right else cell.ljust(width))
        return "  ".join(parts).rstrip()

    out = [line(cells[0], False), "  ".join("-" * w for w in widths)]
    out += [line(r, True) for r in cells[1:]]
    return "\n".join(out)


def _looks_numeric(cell: str) -> bool:
    return bool(cell) and (cell[0].isdigit() or cell[0] == "-" and cell[1:2].isdigit())


def ms(value: float | None) -> str:
    """Milliseconds with 3-4 significant digits and no exponent."""
    if value is None:
        return "-"
    for limit, digits in ((100, 0), (10, 1), (1, 2)):
        if value >= limit:
            return f"{value:.{digits}f}"
    return f"{value:.3f}"


def times(value: float) -> str:
    return f"{value:.2f}x" if value < 100 else f"{value:,.0f}x"
