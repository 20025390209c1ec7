"""`moderation db ...`: migrate the decision database and replay the local spool."""

from __future__ import annotations

import json
from pathlib import Path

import click

from moderation.cli import db
from moderation.storage import DecisionLog, StorageError, migrate
from moderation.storage import db as storage_db

DB_HELP = "Database URL (default: $MODERATION_DB_URL, else sqlite:///moderation.db)."


def _fail(err: StorageError) -> click.ClickException:
    return click.ClickException(str(err))


@db.command("upgrade")
@click.option("--db", "url", metavar="URL", help=DB_HELP)
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def upgrade_cmd(url: str | None, revision: str) -> None:
    """Migrate the database up to a revision (creates it when missing)."""
    url = storage_db.resolve_db_url(url)
    try:
        before = migrate.current(url)
        migrate.upgrade(url, revision)
        after = migrate.current(url)
    except StorageError as err:
        raise _fail(err) from err
    where = storage_db.display_url(url)
    if before == after:
        click.echo(f"{where} is already at revision {after}")
    else:
        click.echo(f"upgraded {where} from {before or 'an empty database'} to {after}")


@db.command("downgrade")
@click.option("--revision", required=True, help="Target revision (`base` drops every table).")
@click.option("--db", "url", metavar="URL", help=DB_HELP)
def downgrade_cmd(revision: str, url: str | None) -> None:
    """Migrate the database down to a revision."""
    url = storage_db.resolve_db_url(url)
    try:
        before = migrate.current(url)
        migrate.downgrade(url, revision)
        after = migrate.current(url)
    except StorageError as err:
        raise _fail(err) from err
    click.echo(
        f"downgraded {storage_db.display_url(url)} from {before or 'base'} to {after or 'base'}"
    )


@db.command("current")
@click.option("--db", "url", metavar="URL", help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def current_cmd(url: str | None, as_json: bool) -> None:
    """Show the database's revision and the newest one this version knows."""
    url = storage_db.resolve_db_url(url)
    try:
        revision = migrate.current(url)
    except StorageError as err:
        raise _fail(err) from err
    head = migrate.head_revision()
    if as_json:
        shown = {"url": storage_db.display_url(url), "current": revision, "head": head}
        click.echo(json.dumps(shown))
        return
    state = "up to date" if revision == head else "run `moderation db upgrade`"
    click.echo(
        f"{storage_db.display_url(url)}: revision {revision or 'none'} (head {head}, {state})"
    )


@db.command("replay")
@click.option("--db", "url", metavar="URL", help=DB_HELP)
@click.option(
    "--spool",
    "spool_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Spool folder to replay (default: $MODERATION_SPOOL_DIR, else ./spool).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def replay_cmd(url: str | None, spool_dir: Path | None, as_json: bool) -> None:
    """Write spooled decisions into the database (idempotent) and empty the spool."""
    from moderation.storage.log import default_spool_dir

    spool_dir = spool_dir or default_spool_dir()
    try:
        with DecisionLog(url, spool_dir=spool_dir) as log:
            added = log.replay()
            discarded = list(log.spool.discarded)
    except StorageError as err:
        raise _fail(err) from err
    if as_json:
        click.echo(json.dumps({"added": added, "discarded": discarded}))
        return
    for report in discarded:
        click.echo(f"warning: {report}", err=True)
    click.echo(f"replayed {added} decisions from {spool_dir}")
