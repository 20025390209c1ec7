"""Output shared by every command: aligned tables for people, one JSON shape for scripts."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import click


def model_options(command):
    """--model, --text-model and --device: which checkpoint embeds images and prompts, and where."""
    command = click.option(
        "--device", help="torch device, e.g. cuda or cpu (default: cuda when available)."
    )(command)
    command = click.option(
        "--text-model", help="CLIP checkpoint whose text tower embeds prompts, if MODEL has none."
    )(command)
    return click.option(
        "--model",
        "-m",
        help="CLIP or safety-checker checkpoint (hub id or folder); default: the policy's model.",
    )(command)


def echo_json(data: Any) -> None:
    """Print data as indented JSON (datetimes and paths as strings)."""
    click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces, with a dashed rule under the headers."""
    cells = [[str(h) for h in headers]] + [
        ["" if v is None else str(v) for v in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def echo_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    click.echo(format_table(headers, rows))


def fmt_float(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"
