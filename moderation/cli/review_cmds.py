"""`moderation review ...`: list, show, claim, approve, reject, reopen, stats and export."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from moderation.cli.app import review
from moderation.cli.decisions_cmds import refuse_filters_naming_nothing
from moderation.cli.options import (
    clean,
    db_option,
    echo_json,
    failures,
    json_option,
    open_output,
    output_errors,
    standard_output,
    writing,
)
from moderation.cli.review_text import items_table, render_show, render_stats, table, when
from moderation.review import ReviewQueue
from moderation.review.report import EXPORT_FORMATS
from moderation.storage.db import require_database, resolve_db_url
from moderation.storage.models import REVIEW_STATUSES

reviewer_option = click.option(
    "--reviewer", required=True, metavar="NAME", help="Who is reviewing (recorded in the audit)."
)
token_option = click.option(
    "--token", metavar="T", help="Token of your claim (default: your own live claim is enough)."
)


def concept_options(default: str):
    """--concept NAME (repeatable) and --no-concepts: the labels a verdict records."""

    def decorate(command):
        command = click.option(
            "--no-concepts",
            is_flag=True,
            help="The image shows none of the policy's concepts (every hit was a false alarm).",
        )(command)
        return click.option(
            "--concept",
            "concepts",
            multiple=True,
            metavar="NAME",
            help=f"A concept of the policy the image really shows (repeatable; default: {default}).",
        )(command)

    return decorate


def _labels(concepts: tuple[str, ...], no_concepts: bool) -> list[str] | None:
    """The concepts a verdict names: None for the verdict's default."""
    if concepts and no_concepts:
        raise click.UsageError("give --concept or --no-concepts, not both")
    return [] if no_concepts else list(concepts) or None


def _queue(db_url: str | None, **kwargs: Any) -> ReviewQueue:
    """The queue of an existing database: a mistyped SQLite path must not create an empty one."""
    with failures():
        url = resolve_db_url(db_url)
        require_database(url)
        return ReviewQueue(url, **kwargs)


@review.command("list")
@click.option("--status", type=click.Choice(REVIEW_STATUSES), help="Only items with this status.")
@click.option("--policy", metavar="NAME|DIGEST", help="Policy name or digest prefix.")
@click.option("--concept", metavar="NAME", help="Only decisions where this concept fired.")
@click.option("--since", metavar="DATE", help="Items created at or after an ISO date/datetime.")
@click.option(
    "--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="At most N rows."
)
@json_option
@db_option
@output_errors
def list_cmd(status, policy, concept, since, limit, as_json, db_url):
    """List review items in queue order."""
    queue = _queue(db_url)
    with failures():
        items = queue.list(status=status, policy=policy, concept=concept, since=since, limit=limit)
    if not items:
        refuse_filters_naming_nothing(queue.engine, concept=concept, policy=policy)
    if as_json:
        echo_json([item.to_dict() for item in items])
        return
    if not items:
        click.echo("No review items match.")
        return
    click.echo(items_table([item.to_dict() for item in items]))


@review.command("show")
@click.argument("item_id", type=int)
@json_option
@db_option
@output_errors
def show_cmd(item_id, as_json, db_url):
    """Explain one item: concept scores, special care, history."""
    queue = _queue(db_url)
    with failures():
        shown = queue.show(item_id)
    if as_json:
        echo_json(shown)
        return
    click.echo(render_show(shown))


@review.command("claim")
@reviewer_option
@click.option(
    "-n",
    "count",
    type=click.IntRange(1, 1000),
    default=1,
    show_default=True,
    help="How many items.",
)
@click.option(
    "--lease",
    type=click.IntRange(1, 7 * 24 * 3600),
    default=900,
    show_default=True,
    metavar="SECONDS",
    help="How long the claim stays yours.",
)
@json_option
@db_option
@output_errors
def claim_cmd(reviewer, count, lease, as_json, db_url):
    """Claim the next items of the queue for a reviewer."""
    queue = _queue(db_url, lease_seconds=lease)
    with failures():
        claims = queue.claim(reviewer, count)
    if as_json:
        echo_json([c.to_dict() for c in claims])
        return
    if not claims:
        click.echo("Nothing to claim: the queue is empty.")
        return
    expires = when(claims[0].expires_at)
    click.echo(f"Claimed {len(claims)} item(s) for {clean(reviewer.strip())} until {expires} UTC:")
    rows = [[str(c.item_id), c.decision_id, c.token] for c in claims]
    click.echo(table(["ID", "DECISION", "TOKEN"], rows, right=(0,)))
    click.echo(
        "TOKEN proves a claim is yours: approve/reject accept your own live claim without it;"
        " pass --token T when acting for this claim from another session or script."
    )


@review.command("approve")
@click.argument("item_id", type=int)
@reviewer_option
@click.option("--reason", metavar="TEXT", help="Why the image may be released.")
@token_option
@concept_options("the special-care hits; the fired concepts were false alarms")
@db_option
@output_errors
def approve_cmd(item_id, reviewer, reason, token, concepts, no_concepts, db_url):
    """Approve an item: the held image may be released.

    A claimed item can be decided only by its owner while the lease lasts (and with the
    claim's token when --token is given); a pending item nobody holds may be decided directly.
    The verdict records that the concepts that fired were false alarms; --concept names what
    the image shows although it is acceptable (e.g. a special-care concept).
    """
    labels = _labels(concepts, no_concepts)
    queue = _queue(db_url)
    with failures():
        queue.approve(item_id, reviewer, token=token, reason=reason, concepts=labels)
    click.echo(f"Approved item {item_id}.")


@review.command("reject")
@click.argument("item_id", type=int)
@reviewer_option
@click.option("--reason", required=True, metavar="TEXT", help="Why the image stays moderated.")
@token_option
@concept_options("the concepts that fired")
@db_option
@output_errors
def reject_cmd(item_id, reviewer, reason, token, concepts, no_concepts, db_url):
    """Reject an item: the moderation stands.

    Same rules as approve: your own live claim, or a pending item nobody holds. The verdict
    records which of the policy's concepts the image really shows (--concept; a concept that
    did not fire is a miss); `moderation policy calibrate` learns thresholds from them.
    """
    labels = _labels(concepts, no_concepts)
    queue = _queue(db_url)
    with failures():
        queue.reject(item_id, reviewer, reason=reason, token=token, concepts=labels)
    click.echo(f"Rejected item {item_id}.")


@review.command("reopen")
@click.argument("item_id", type=int)
@reviewer_option
@click.option("--reason", required=True, metavar="TEXT", help="Why the item is appealed.")
@db_option
@output_errors
def reopen_cmd(item_id, reviewer, reason, db_url):
    """Reopen (appeal) an approved or rejected item as a new pending item."""
    queue = _queue(db_url)
    with failures():
        new_id = queue.reopen(item_id, reviewer, reason)
    click.echo(f"Reopened item {item_id} as item {new_id} (pending).")


@review.command("stats")
@json_option
@db_option
@output_errors
def stats_cmd(as_json, db_url):
    """Queue depth and live decisions per action and concept."""
    queue = _queue(db_url)
    with failures():
        stats = queue.stats()
    if as_json:
        echo_json(stats)
        return
    click.echo(render_stats(stats))


@review.command("export")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File to write (default: stdout); an existing file needs --force.",
)
@click.option("--force", is_flag=True, help="Overwrite the --output file if it exists.")
@db_option
@output_errors
def export_cmd(fmt, output, force, db_url):
    """Export live decisions with their review status as JSON lines or CSV.

    Shadow decisions (candidate policies scored on live traffic) are left out; `labels` is
    what the latest verdict says the image shows (empty until a verdict).

    CSV is for spreadsheets: control characters are escaped and cells that start like a
    formula (=, +, -, @) get a leading '. JSON lines keep every value exactly.
    """
    queue = _queue(db_url)
    if output is None or str(output) == "-":
        with failures():
            queue.export(fmt, standard_output())
        return
    created = not os.path.lexists(output)
    out = open_output(output, force=force)
    try:
        with writing(output), failures(), out:
            count = queue.export(fmt, out)
    except BaseException:
        if created:
            output.unlink(missing_ok=True)  # no half-written export left behind
        raise
    click.echo(f"Exported {count} decisions to {clean(output)}.", err=True)
