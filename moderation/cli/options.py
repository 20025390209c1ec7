"""What every command shares: --db, --json, model options, one JSON style, tables, errors, and
the rules for text that reaches a terminal (`clean`) or a file (`output_errors`, `writing`)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from moderation.errors import ModerationError
from moderation.text import BEYOND_C0, escape_controls
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


def clean(value: Any) -> str:
    """Text safe for one terminal line: control characters escaped (`\\x1b`, `\\n`); None -> "".

    Every human-readable output goes through here (tables, messages that echo user input)."""
    return escape_controls(value)


@contextlib.contextmanager
def failures() -> Iterator[None]:
    """Errors meant for people become one line and exit 1, never a traceback."""
    try:
        yield
    except PolicyError as err:
        # One issue per line, each already escaped by the policy package.
        raise click.ClickException("\n".join(map(clean, str(err).split("\n")))) from err
    except ModerationError as err:
        raise click.ClickException(clean(err)) from err


def echo_json(data: Any) -> None:
    """Print data as indented JSON: the one JSON style of every command (datetimes as strings).

    The data stays exact; characters a terminal could act on are written as `\\uXXXX` escapes.
    """
    text = json.dumps(data, indent=2, default=str, ensure_ascii=False)
    click.echo(BEYOND_C0.sub(lambda m: f"\\u{ord(m.group()):04x}", text))


# -- writing output ---------------------------------------------------------------------------
F = TypeVar("F", bound=Callable[..., Any])


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that the exit-time flush cannot fail again."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):
        pass  # not a real file (tests), or already gone


def _output_error(err: OSError) -> click.ClickException:
    reason = err.strerror or str(err)
    if err.filename is None:
        _silence_stdout()
        return click.ClickException(f"cannot write to standard output: {reason}")
    return click.ClickException(f"{clean(err.filename)}: {reason}")  # files we write: `writing`


def output_errors(command: F) -> F:
    """Make a command's output failures (disk full, closed or broken standard output, a
    read-only folder) one line and exit 1 instead of a traceback or a silent loss."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            result = command(*args, **kwargs)
            # Started with a closed stdout, click.echo drops everything: say so. A full disk or
            # a broken pipe shows at this flush, not at exit.
            standard_output().flush()
        except OSError as err:
            raise _output_error(err) from err
        return result

    return run  # type: ignore[return-value]


def standard_output() -> IO[str]:
    """sys.stdout, or a one-line error when the process was started with it closed."""
    if sys.stdout is None:
        raise click.ClickException("cannot write to standard output: it is closed")
    return sys.stdout


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """An OSError while writing `path` becomes `cannot write PATH: REASON` (exit 1)."""
    try:
        yield
    except OSError as err:
        raise click.ClickException(f"cannot write {clean(path)}: {err.strerror or err}") from err


_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a named pipe",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
}


def regular_target(path: Path) -> None:
    """Refuse an output path that exists and is not a regular file (a device, a link, ...):
    writing a file by rename would replace it."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise click.ClickException(f"cannot write {clean(path)}: {err.strerror}") from err
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise click.ClickException(
            f"refusing to write {clean(path)}: it is {kind}, not a regular file"
        )


@contextlib.contextmanager
def open_output(path: Path, *, force: bool) -> Iterator[IO[str]]:
    """A text file (UTF-8) at `path`; an existing one is replaced only with `force`.

    A new or regular file is written whole (policy.atomic: never half-written, never through a
    planted temporary link); a device, a pipe or a link the user named is written into, as
    named, never replaced."""
    from policy.atomic import atomic_file

    if not force and os.path.lexists(path):
        raise click.ClickException(f"{clean(path)} exists; pass --force to overwrite it")
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        with writing(path), open(path, "w", encoding="utf-8", newline="") as file:
            yield file
        return
    with writing(path), atomic_file(path, text=True, newline="", overwrite=force) as file:
        yield file


# -- tables -----------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces, with a dashed rule under the headers.

    Every cell is escaped (`clean`): one row is always one line."""
    cells = [[clean(h) for h in headers]] + [[clean(v) for v in row] for row in rows]
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
