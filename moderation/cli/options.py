"""What every command shares: --db, --json, --model, --since/--until, --top, --out, one JSON
style, tables, one error handling (`command_errors`), and the rules for text that reaches a
terminal (`clean`) or a file (`writing`)."""

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
from moderation.tables import format_table
from moderation.text import BEYOND_C0, escape_controls
from policy.errors import PolicyError

DB_HELP = "Database URL (default: $MODERATION_DB_URL, else sqlite:///moderation.db)."

db_option = click.option("--db", "db_url", metavar="URL", help=DB_HELP)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of text."
)
model_option = click.option(
    "--model",
    "-m",
    metavar="MODEL",
    help="CLIP or safety-checker checkpoint (folder or hub id); default: the policy's model.",
)
# The policy a command judges with, and the candidates it scores beside it (check, serve).
policy_option = click.option(
    "--policy",
    "-p",
    "policy_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Policy YAML, or a compiled .safetensors artifact.",
)
shadow_option = click.option(
    "--shadow",
    "shadow_paths",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Candidate policy (YAML or artifact) scored beside --policy on the same embeddings and "
    "logged as shadow decisions, never acted on (repeatable).",
)
TIME_FORMATS = (
    "an ISO date or datetime (UTC unless it says), or a span back from now such as 12h or 7d"
)
since_option = click.option(
    "--since", metavar="T", help=f"Only what was logged at or after T: {TIME_FORMATS}."
)
until_option = click.option(
    "--until", metavar="T", help="Only what was logged before T (as --since)."
)


def top_option(default: int = 0):
    """--top N: only the N concepts of highest score (over or nearest their threshold)."""
    return click.option(
        "--top",
        type=click.IntRange(0),
        default=default,
        show_default=bool(default),
        metavar="N",
        help="Show only the N concepts of highest score, over or nearest their threshold "
        "(0: every concept).",
    )


class HiddenAliases(click.Option):
    """An option whose deprecated names still work but are left out of --help."""

    def __init__(self, *args: Any, hidden_names: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_names = tuple(hidden_names)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        shown = self.opts
        self.opts = [o for o in shown if o not in self.hidden_names]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


def out_option(
    help: str,
    *,
    name: str = "out",
    file: bool = True,
    deprecated: Sequence[str] = (),
    metavar: str | None = None,
    **kwargs: Any,
):
    """--out/-o PATH: the file (or, with file=False, folder) a command writes; `deprecated`:
    older names of the option that still work, unlisted."""
    path = click.Path(dir_okay=not file, file_okay=file, path_type=Path)
    return click.option(
        "--out",
        "-o",
        *deprecated,
        name,
        cls=HiddenAliases,
        hidden_names=deprecated,
        type=path,
        metavar=metavar or ("FILE" if file else "DIR"),
        help=help,
        **kwargs,
    )


def model_options(command):
    """--model, --text-model and --device: which checkpoint embeds images and prompts, and where."""
    command = click.option(
        "--device", help="torch device, e.g. cuda or cpu (default: cuda when available)."
    )(command)
    command = click.option(
        "--text-model", help="CLIP checkpoint whose text tower embeds prompts, if MODEL has none."
    )(command)
    return model_option(command)


def clean(value: Any) -> str:
    """Text safe for one terminal line: control characters escaped (`\\x1b`, `\\n`); None -> "".

    Every human-readable output goes through here (tables, messages that echo user input)."""
    return escape_controls(value)


def _people_error(err: PolicyError | ModerationError) -> click.ClickException:
    """An error meant for people as one escaped line (a policy's issues: one line each)."""
    if isinstance(err, PolicyError):
        # One issue per line, each already escaped by the policy package.
        return click.ClickException("\n".join(map(clean, str(err).split("\n"))))
    return click.ClickException(clean(err))


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


def command_errors(command: F) -> F:
    """The one error handling of every command: errors meant for people (a policy's issues, a
    ModerationError) and output failures (disk full, closed or broken standard output, a
    read-only folder) become one line and exit 1, never a traceback or a silent loss."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            result = command(*args, **kwargs)
            # Started with a closed stdout, click.echo drops everything: say so. A full disk or
            # a broken pipe shows at this flush, not at exit.
            standard_output().flush()
        except (PolicyError, ModerationError) as err:
            raise _people_error(err) from err
        except OSError as err:
            raise _output_error(err) from err
        return result

    run.command_errors = True  # type: ignore[attr-defined]  # (checked by tests/test_cli_grammar.py)
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


def echo_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    click.echo(format_table(headers, rows))
