"""`moderation policy backtest | shadow-report`: what a candidate policy would have done to the
logged history, and what it did on live traffic beside the live policy."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from moderation.cli.app import policy
from moderation.cli.options import (
    clean,
    command_errors,
    db_option,
    echo_json,
    json_option,
    model_option,
    since_option,
    until_option,
)
from moderation.tables import format_table

DEFAULT_EXAMPLES = 5


def _filters(command):
    command = click.option(
        "--examples",
        type=click.IntRange(min=0),
        default=DEFAULT_EXAMPLES,
        show_default=True,
        metavar="K",
        help="Up to K decision ids per transition (oldest first), for `decisions show`.",
    )(command)
    command = click.option(
        "--limit", type=click.IntRange(min=1), metavar="N", help="Read at most N decisions."
    )(command)
    return since_option(until_option(command))


def _progress(as_json: bool) -> bool:
    """A progress bar on stderr only when a person watches a terminal and reads text."""
    return not as_json and sys.stderr.isatty()


def _candidate_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise click.ClickException(f"cannot read candidate {clean(value)}: no such file")
    return path


@policy.command("backtest", short_help="Decide the logged history again with CANDIDATE.")
@click.argument("candidate", metavar="CANDIDATE")
@model_option
@db_option
@click.option(
    "--policy",
    "policy_filter",
    metavar="NAME|DIGEST",
    help="Only decisions of the logged policy of this name or digest prefix.",
)
@_filters
@json_option
@command_errors
def backtest_command(
    candidate, model, db_url, policy_filter, since, until, limit, examples, as_json
):  # fmt: skip
    """Decide the logged history again with CANDIDATE (YAML or compiled artifact) and compare.

    Every live decision in the filters made by the candidate's model with a stored embedding is
    decided again, oldest first, in chunks (memory stays bounded), from the stored embeddings:
    no images and no GPU. Where a candidate concept is the very vector the logged policy had
    (same vector digest), its logged float32 cosine is reused, so an unchanged concept decides
    exactly as logged and a moved threshold changes exactly the decisions that cross it; new or
    changed concepts are scored from the float16 embeddings (their maximum over the image's
    views). Thresholds, special care and the action are the engine's own code.

    Reports decisions read, scored and skipped (no_embedding, other_model, error_verdict), the
    action and verdict transitions, how often each concept fired before and after, agreement
    with reviewers' verdicts, and example decision ids per transition.
    """
    from moderation.lifecycle.backtest import backtest
    from moderation.lifecycle.history import Filters

    path = _candidate_file(candidate)
    filters = Filters.parse(since, until, policy_filter, limit)
    _database(db_url)  # before a model loads: a typo in --db fails at once
    compiled = _load(path, model)
    data = backtest(
        compiled, db=db_url, filters=filters, examples=examples, progress=_progress(as_json)
    )
    if as_json:
        echo_json(data)
    else:
        click.echo(render(data, title="Backtest of"))


def _database(url: str | None) -> None:
    from moderation.storage.db import require_database, resolve_db_url

    require_database(resolve_db_url(url))


def _load(path: Path, model: str | None):
    from moderation.errors import ModerationError
    from moderation.lifecycle.backtest import load_candidate

    try:
        return load_candidate(path, model=model)
    except (OSError, ValueError) as err:
        # A model that cannot be read (missing folder, no hub) or a malformed artifact.
        raise ModerationError(f"cannot load candidate {path}: {err}") from err


@policy.command("shadow-report", short_help="Report what shadow CANDIDATE decided on live traffic.")
@click.argument("candidate", metavar="CANDIDATE")
@model_option
@db_option
@_filters
@json_option
@command_errors
def shadow_report_command(candidate, model, db_url, since, until, limit, examples, as_json):
    """Report what shadow CANDIDATE decided on live traffic, against the live decisions.

    CANDIDATE is a policy file (YAML or compiled artifact: its digest names its shadow
    decisions) or a logged policy's name or digest prefix. Reads the shadow decisions that
    `Moderator(..., shadow=[...])` or `moderation check --shadow` logged beside each live
    decision: "before" is the live decision, "after" the shadow one. Needs no embeddings (works
    with store_embeddings off) and no model for a digest. Same report as `policy backtest`.
    """
    from moderation.lifecycle.history import Filters
    from moderation.lifecycle.shadow_report import shadow_report

    filters = Filters.parse(since, until, None, limit)
    _database(db_url)
    # A file is loaded here (its digest names its shadow rows); anything else is a logged
    # policy's name or digest prefix.
    given = _load(Path(candidate), model) if Path(candidate).is_file() else candidate
    data = shadow_report(
        given,
        db=db_url,
        filters=filters,
        examples=examples,
        progress=_progress(as_json),
    )
    if as_json:
        echo_json(data)
    else:
        click.echo(render(data, title="Shadow report of"))


# -- text -------------------------------------------------------------------------------------


def render(data: Mapping[str, Any], *, title: str) -> str:
    """The report as text: a summary, the transition tables, concepts and review agreement."""
    c = data["candidate"]
    lines = [
        f"{title} {clean(c['name'])} v{clean(c['version'])} (digest {clean(c['digest'])[:12]}, "
        f"model {clean(c.get('model'))})"
    ]
    shown = {k: v for k, v in data["filters"].items() if v is not None and k != "db"}
    where = f" from {clean(data['filters'].get('db'))}" if data["filters"].get("db") else ""
    if shown:
        where += " (" + ", ".join(f"{clean(k)} {clean(v)}" for k, v in shown.items()) + ")"
    lines.append(f"{data['decisions']:,} decisions read{where}: {data['scored']:,} scored")
    if data["skipped"]:
        lines.append(
            "skipped: "
            + ", ".join(f"{n:,} {clean(r).replace('_', ' ')}" for r, n in data["skipped"].items())
        )
    share = f" ({100 * data['changed'] / data['scored']:.2f}%)" if data["scored"] else ""
    lines.append(f"changed action: {data['changed']:,} of {data['scored']:,}{share}")
    for note in data.get("notes", ()):
        lines.append(clean(note))
    if data["transitions"]:
        rows = []
        for key, count in data["transitions"].items():
            old, new = key.split("->")
            examples = ", ".join(data["examples"].get(key, [])) if old != new else ""
            rows.append((old, new, f"{count:,}", examples))
        lines += [
            "",
            "Actions",
            format_table(("LOGGED", "CANDIDATE", "DECISIONS", "EXAMPLES"), rows),
        ]
        rows = [(*k.split("->"), f"{n:,}") for k, n in data["verdicts"].items()]
        lines += ["", "Verdicts", format_table(("LOGGED", "CANDIDATE", "DECISIONS"), rows)]
    for label, table in (("Concepts", data["concepts"]), ("Special care", data["special_care"])):
        if table:
            rows = [
                (name, f"{t['before']:,}", f"{t['after']:,}", f"{t['after'] - t['before']:+,}")
                for name, t in table.items()
            ]
            head = ("CONCEPT", "FIRED BEFORE", "AFTER", "CHANGE")
            lines += ["", f"{label} (how often each fired)", format_table(head, rows)]
    a, r = data["reviewed"]["approved"], data["reviewed"]["rejected"]
    lines += [
        "",
        "Against reviewers' verdicts",
        f"approved by a reviewer: {a['total']:,}; flagged (verdict flag, not review) as logged "
        f"{a['was_flagged']:,}, by the candidate {a['now_flagged']:,} (over-blocking)",
        f"rejected by a reviewer: {r['total']:,}; allowed as logged {r['was_allowed']:,}, by the "
        f"candidate {r['now_allowed']:,} (misses)",
    ]
    if data["changed"]:
        lines += ["", "`moderation decisions show ID` explains an example."]
    return "\n".join(lines)
