"""`moderation review ...`: list, show, claim, approve, reject, reopen, stats and export."""

from __future__ import annotations

from typing import Any

import click

from moderation.cli.app import review
from moderation.cli.decisions_cmds import refuse_filters_naming_nothing
from moderation.cli.decisions_text import render_show
from moderation.cli.options import (
    clean,
    command_errors,
    db_option,
    echo_json,
    json_option,
    open_output,
    out_option,
    since_option,
    standard_output,
    until_option,
    writing,
)
from moderation.cli.review_text import items_table, render_stats, table, when
from moderation.errors import ModerationError
from moderation.review import ReviewQueue
from moderation.review.report import EXPORT_FORMATS
from moderation.storage.db import require_database, resolve_db_url
from policy.errors import PolicyError
from policy.vocabulary import REVIEW_STATUSES

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
    url = resolve_db_url(db_url)
    require_database(url)
    return ReviewQueue(url, **kwargs)


def _done(as_json: bool, text: str, **result: Any) -> None:
    """What a verdict command did: one line of text, or its JSON object with --json."""
    if as_json:
        echo_json(result)
    else:
        click.echo(text)


@review.command("list")
@click.option("--status", type=click.Choice(REVIEW_STATUSES), help="Only items with this status.")
@click.option("--policy", metavar="NAME|DIGEST", help="Policy name or digest prefix.")
@click.option("--concept", metavar="NAME", help="Only decisions where this concept fired.")
@since_option
@until_option
@click.option(
    "--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="At most N rows."
)
@json_option
@db_option
@command_errors
def list_cmd(status, policy, concept, since, until, limit, as_json, db_url):
    """List review items in queue order."""
    queue = _queue(db_url)
    items = queue.list(
        status=status, policy=policy, concept=concept, since=since, until=until, limit=limit
    )
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
@command_errors
def show_cmd(item_id, as_json, db_url):
    """Explain one item: concept scores, special care, history."""
    queue = _queue(db_url)
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
@command_errors
def claim_cmd(reviewer, count, lease, as_json, db_url):
    """Claim the next items of the queue for a reviewer."""
    queue = _queue(db_url, lease_seconds=lease)
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
@click.argument("item_ids", metavar="ITEM_ID...", nargs=-1, required=True, type=int)
@reviewer_option
@click.option("--reason", metavar="TEXT", help="Why the image may be released.")
@token_option
@concept_options("the special-care hits; the fired concepts were false alarms")
@json_option
@db_option
@command_errors
def approve_cmd(item_ids, reviewer, reason, token, concepts, no_concepts, as_json, db_url):
    """Approve items: their held images may be released.

    A claimed item can be decided only by its owner while the lease lasts (and with the
    claim's token when --token is given); a pending item nobody holds may be decided directly.
    The verdict records that the concepts that fired were false alarms; --concept names what
    the image shows although it is acceptable (e.g. a special-care concept). Several ids
    (`review approve 4 5 6`) are decided one by one, each in its own transaction.
    """
    labels = _labels(concepts, no_concepts)
    queue = _queue(db_url)
    _batch(
        item_ids,
        token,
        "approved",
        lambda i: queue.approve(i, reviewer, token=token, reason=reason, concepts=labels),
        as_json,
    )


@review.command("reject")
@click.argument("item_ids", metavar="ITEM_ID...", nargs=-1, required=True, type=int)
@reviewer_option
@click.option("--reason", required=True, metavar="TEXT", help="Why the image stays moderated.")
@token_option
@concept_options("the concepts that fired")
@json_option
@db_option
@command_errors
def reject_cmd(item_ids, reviewer, reason, token, concepts, no_concepts, as_json, db_url):
    """Reject items: the moderation stands.

    Same rules as approve: your own live claim, or a pending item nobody holds. The verdict
    records which of the policy's concepts the image really shows (--concept; a concept that
    did not fire is a miss); `moderation policy calibrate` learns thresholds from them.
    """
    labels = _labels(concepts, no_concepts)
    queue = _queue(db_url)
    _batch(
        item_ids,
        token,
        "rejected",
        lambda i: queue.reject(i, reviewer, reason=reason, token=token, concepts=labels),
        as_json,
    )


def _batch(
    item_ids: tuple[int, ...], token: str | None, status: str, decide, as_json: bool
) -> None:
    """Decide each item in turn; one id decides like any command, several report each failure
    on its own line (or as `error` in the JSON list) and exit 1 if any failed."""
    if token and len(item_ids) > 1:
        raise click.UsageError("--token names one claim: give one item id with it")
    ids = list(dict.fromkeys(item_ids))
    if len(ids) == 1:
        decide(ids[0])
        _done(as_json, f"{status.capitalize()} item {ids[0]}.", item_id=ids[0], status=status)
        return
    results: list[dict[str, Any]] = []
    for item_id in ids:
        try:
            decide(item_id)
        except (PolicyError, ModerationError) as err:
            results.append({"item_id": item_id, "status": None, "error": str(err)})
            if not as_json:
                click.echo(f"Error: {clean(err)}", err=True)
            continue
        results.append({"item_id": item_id, "status": status})
        if not as_json:
            click.echo(f"{status.capitalize()} item {item_id}.")
    if as_json:
        echo_json(results)
    failed = sum(r["status"] is None for r in results)
    if failed:
        raise click.ClickException(f"{failed} of {len(ids)} items were not decided")


@review.command("reopen", short_help="Reopen (appeal) a decided item as a new pending one.")
@click.argument("item_id", type=int)
@reviewer_option
@click.option("--reason", required=True, metavar="TEXT", help="Why the item is appealed.")
@json_option
@db_option
@command_errors
def reopen_cmd(item_id, reviewer, reason, as_json, db_url):
    """Reopen (appeal) an approved or rejected item as a new pending item."""
    queue = _queue(db_url)
    new_id = queue.reopen(item_id, reviewer, reason)
    text = f"Reopened item {item_id} as item {new_id} (pending)."
    _done(as_json, text, item_id=item_id, status="reopened", new_item_id=new_id)


@review.command("stats")
@json_option
@db_option
@command_errors
def stats_cmd(as_json, db_url):
    """Queue depth and live decisions per action and concept."""
    queue = _queue(db_url)
    stats = queue.stats()
    if as_json:
        echo_json(stats)
        return
    click.echo(render_stats(stats))


@review.command("export", short_help="Export live decisions and their review status.")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True)
@out_option(
    "File to write (default: stdout); an existing file needs --force.",
    name="output",
    deprecated=("--output",),  # its name before --out was every command's
)
@click.option("--force", is_flag=True, help="Overwrite the --out file if it exists.")
@db_option
@command_errors
def export_cmd(fmt, output, force, db_url):
    """Export live decisions with their review status as JSON lines or CSV.

    Shadow decisions (candidate policies scored on live traffic) are left out; `labels` is
    what the latest verdict says the image shows (empty until a verdict).

    CSV is for spreadsheets: control characters are escaped and cells that start like a
    formula (=, +, -, @) get a leading '. JSON lines keep every value exactly.
    """
    queue = _queue(db_url)
    if output is None or str(output) == "-":
        queue.export(fmt, standard_output())
        return
    # Written whole or not at all (no half-written export left behind).
    with writing(output), open_output(output, force=force) as out:
        count = queue.export(fmt, out)
    click.echo(f"Exported {count} decisions to {clean(output)}.", err=True)
