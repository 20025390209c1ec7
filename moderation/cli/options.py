"""What every command shares: --db, --json, model options, one JSON style, tables and errors."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import click

from moderation.errors import ModerationError
from policy.errors import PolicyError

DB_HELP = "Database URL (default: $MODERATION_DB_URL, else sqlite:///moderation.db)."

db_option = click.option("--db", "db_url", metavar="URL", help=DB_HELP)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of text."
)


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


@contextlib.contextmanager
def failures() -> Iterator[None]:
    """Errors meant for people become one line and exit 1, never a traceback."""
    try:
        yield
    except (ModerationError, PolicyError) as err:
        raise click.ClickException(str(err)) from err


def echo_json(data: Any) -> None:
    """Print data as indented JSON: the one JSON style of every command (datetimes as strings)."""
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
