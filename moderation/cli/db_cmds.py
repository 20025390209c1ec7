"""`moderation db ...`: migrate the decision database and replay the local spool."""

from __future__ import annotations

from pathlib import Path

import click

from moderation.cli.app import db
from moderation.cli.options import db_option, echo_json, failures, json_option
from moderation.storage import DecisionLog
from moderation.storage import db as storage_db
from moderation.storage import schema as migrate


@db.command("upgrade")
@db_option
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def upgrade_cmd(db_url: str | None, revision: str) -> None:
    """Migrate the database up to a revision (creates it when missing)."""
    url = storage_db.resolve_db_url(db_url)
    with failures():
        before = migrate.current(url)
        migrate.upgrade(url, revision)
        after = migrate.current(url)
    where = storage_db.display_url(url)
    if before == after:
        click.echo(f"{where} is already at revision {after}")
    else:
        click.echo(f"upgraded {where} from {before or 'an empty database'} to {after}")


@db.command("downgrade")
@click.option("--revision", required=True, help="Target revision (`base` drops every table).")
@db_option
def downgrade_cmd(revision: str, db_url: str | None) -> None:
    """Migrate the database down to a revision."""
    url = storage_db.resolve_db_url(db_url)
    with failures():
        before = migrate.current(url)
        migrate.downgrade(url, revision)
        after = migrate.current(url)
    click.echo(
        f"downgraded {storage_db.display_url(url)} from {before or 'base'} to {after or 'base'}"
    )


@db.command("current")
@db_option
@json_option
def current_cmd(db_url: str | None, as_json: bool) -> None:
    """Show the database's revision and the newest one this version knows."""
    url = storage_db.resolve_db_url(db_url)
    with failures():
        revision = migrate.current(url)
    head = migrate.head_revision()
    if as_json:
        shown = {"url": storage_db.display_url(url), "current": revision, "head": head}
        echo_json(shown)
        return
    state = "up to date" if revision == head else "run `moderation db upgrade`"
    click.echo(
        f"{storage_db.display_url(url)}: revision {revision or 'none'} (head {head}, {state})"
    )


@db.command("replay")
@db_option
@click.option(
    "--spool",
    "spool_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Spool folder to replay (default: $MODERATION_SPOOL_DIR, else ./spool).",
)
@json_option
def replay_cmd(db_url: str | None, spool_dir: Path | None, as_json: bool) -> None:
    """Write spooled decisions into the database (idempotent) and empty the spool."""
    from moderation.storage.log import default_spool_dir

    spool_dir = spool_dir or default_spool_dir()
    with failures(), DecisionLog(db_url, spool_dir=spool_dir) as log:
        added = log.replay()
        discarded = list(log.spool.discarded)
    if as_json:
        echo_json({"added": added, "discarded": discarded})
        return
    for report in discarded:
        click.echo(f"warning: {report}", err=True)
    click.echo(f"replayed {added} decisions from {spool_dir}")
