"""Tables and numbers as people read them in a terminal: the one formatter of the CLI's and the
benchmark's text output. Every cell is escaped (`moderation.text`), so one row is one line."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any, Literal

from moderation.text import escape_controls


def format_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    right: Collection[int] | Literal["numbers"] = (),
    rule: bool = True,
    missing: str = "",
) -> str:
    """Columns padded to their widest cell and separated by two spaces, a dashed rule under
    the headers (unless `rule` is False). `right`: the indexes of right-aligned columns, or
    "numbers" for every cell after the first column that looks like a number. A None cell
    shows as `missing`."""
    head = [escape_controls(h) for h in headers]
    body = [[missing if v is None else escape_controls(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(head)]

    def line(cells: Sequence[str], is_header: bool) -> str:
        parts = []
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True)):
            if right == "numbers":
                flush = not is_header and i > 0 and _looks_numeric(cell)
            else:
                flush = i in right
            parts.append(cell.rjust(width) if flush else cell.ljust(width))
        return "  ".join(parts).rstrip()

    lines = [line(head, True), *(line(r, False) for r in body)]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _looks_numeric(cell: str) -> bool:
    return bool(cell) and (cell[0].isdigit() or cell[0] == "-" and cell[1:2].isdigit())


def fixed(value: float | None, digits: int = 3, *, signed: bool = False) -> str:
    """A number with `digits` decimals (`+0.146` when signed), `-` when missing or NaN."""
    if value is None or value != value:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def plural(count: int, word: str) -> str:
    """`1 policy file`, `2 policy files`."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"
