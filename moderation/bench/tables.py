"""How `moderation bench` prints numbers: aligned tables and milliseconds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moderation.tables import format_table


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns separated by two spaces, numbers right-aligned, a dashed rule under the headers."""
    return format_table(headers, rows, right="numbers", missing="-")


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
