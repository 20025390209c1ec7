"""One grammar for every command: --help everywhere, listings not cut off, --db, --out/-o,
--json as a flag, one definition of --model, --since/--until and --top, one error handling."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from moderation.cli import main


def commands(group: click.Group = main, path: tuple[str, ...] = ()):
    """(path, command) of every command and group under `group`, itself included."""
    yield path, group
    for name, sub in sorted(group.commands.items()):
        if isinstance(sub, click.Group):
            yield from commands(sub, (*path, name))
        else:
            yield (*path, name), sub


ALL = list(commands())
LEAVES = [(p, c) for p, c in ALL if not isinstance(c, click.Group)]
GROUPS = [(p, c) for p, c in ALL if isinstance(c, click.Group)]


def ids(items):
    return [" ".join(p) or "moderation" for p, _ in items]


def options(command: click.Command) -> dict[str, click.Option]:
    return {o: p for p in command.params if isinstance(p, click.Option) for o in p.opts}


@pytest.mark.parametrize(("path", "command"), ALL, ids=ids(ALL))
def test_every_command_has_help(path, command):
    result = CliRunner().invoke(main, [*path, "--help"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: ") and command.help


@pytest.mark.parametrize(("path", "group"), GROUPS, ids=ids(GROUPS))
def test_group_listings_show_each_one_line_help_whole(path, group):
    text = CliRunner().invoke(main, [*path, "--help"], terminal_width=80).output
    listing = text.split("Commands:\n", 1)[1].splitlines()
    assert len(listing) == len(group.commands)  # one line each
    for line, (name, sub) in zip(listing, sorted(group.commands.items()), strict=True):
        whole = sub.short_help or sub.help.split("\n\n")[0].replace("\n", " ")
        assert line.split(None, 1) == [name, whole.strip()]
        assert not line.endswith("...")


def test_the_listing_check_can_fail():
    @click.group()
    def group():
        """A group."""

    @group.command("x")
    def x():
        """A first sentence that is far too long to fit on one line of a group's listing here."""

    text = CliRunner().invoke(group, ["--help"], terminal_width=80).output
    assert text.rstrip().endswith("...")


@pytest.mark.parametrize(("path", "command"), LEAVES, ids=ids(LEAVES))
def test_every_command_turns_errors_into_one_line(path, command):
    assert getattr(command.callback, "command_errors", False), "missing @command_errors"


@pytest.mark.parametrize(("path", "command"), LEAVES, ids=ids(LEAVES))
def test_one_grammar_for_shared_options(path, command):
    opts = options(command)
    visible = {o for o, p in opts.items() if o not in getattr(p, "hidden_names", ())}
    assert not visible & {"--db-url", "--output", "--out-dir"}
    if "--json" in opts:
        assert opts["--json"].is_flag, "--json prints JSON to stdout; files take --out"
    if "--out" in opts:
        assert "-o" in opts["--out"].opts
    if any(isinstance(p, click.Option) and p.name in ("db_url", "db_urls") for p in command.params):
        assert "--db" in opts


SERVERS = [" ".join(p) for p, _ in LEAVES if p == ("serve",)]


def test_every_command_that_prints_a_result_takes_json():
    # review export writes its data in the format asked for (--format jsonl or csv); servers
    # (review serve, serve) print no result
    missing = [" ".join(p) for p, c in LEAVES if "--json" not in options(c)]
    assert sorted(missing) == sorted(["review export", "review serve", *SERVERS])


def _helps(name: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path, command in LEAVES:
        option = options(command).get(name)
        if option is not None:
            found.setdefault(option.help, set()).add(" ".join(path))
    return found


@pytest.mark.parametrize("name", ["--model", "--since", "--until", "--top", "--db"])
def test_a_shared_option_has_one_definition(name):
    # bench times a model with no policy (default: random weights) on several databases
    helps = {h: c for h, c in _helps(name).items() if c != {"bench"}}
    assert len(helps) == 1, helps


def test_the_since_help_names_both_formats():
    (text,) = _helps("--since")
    assert "ISO date" in text and "7d" in text


def test_deprecated_names_still_work_unlisted():
    bench = main.commands["bench"]
    ctx = bench.make_context("bench", ["--db-url", "sqlite", "--db", "postgresql://x/y"])
    assert ctx.params["db_urls"] == ("sqlite", "postgresql://x/y")
    help_text = CliRunner().invoke(main, ["bench", "--help"]).output
    assert "--db URL" in help_text and "--db-url" not in help_text
    export = main.commands["review"].commands["export"]
    ctx = export.make_context("export", ["--format", "csv", "--output", "x.csv"])
    assert str(ctx.params["output"]) == "x.csv"
    help_text = CliRunner().invoke(main, ["review", "export", "--help"]).output
    assert "-o, --out FILE" in help_text and "--output" not in help_text
