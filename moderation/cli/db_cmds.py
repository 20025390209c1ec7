"""`moderation db ...`: migrate the decision database, replay the local spool, and say where
decisions wait (`db status`: the database's revision, the spool and its quarantine)."""

from __future__ import annotations

from pathlib import Path

import click

from moderation.cli.app import db
from moderation.cli.options import (
    clean,
    db_option,
    echo_json,
    failures,
    json_option,
    output_errors,
)
from moderation.storage import DecisionLog
from moderation.storage import db as storage_db
from moderation.storage import schema as migrate
from moderation.storage.errors import OtherDatabaseError, StorageError
from moderation.storage.spool_status import count_folder, count_quarantine


def _shown(url: str) -> str:
    return clean(storage_db.display_url(url))


def _warn_if_shared(url: str) -> None:
    warning = storage_db.loose_mode_warning(url)
    if warning:
        click.echo(f"warning: {clean(warning)}", err=True)


@db.command("upgrade")
@db_option
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@output_errors
def upgrade_cmd(db_url: str | None, revision: str) -> None:
    """Migrate the database up to a revision (creates it when missing)."""
    url = storage_db.resolve_db_url(db_url)
    with failures():
        before = migrate.current(url)
        migrate.upgrade(url, revision)
        after = migrate.current(url)
    where = _shown(url)
    _warn_if_shared(url)
    if before == after:
        click.echo(f"{where} is already at revision {after}")
    else:
        click.echo(f"upgraded {where} from {before or 'an empty database'} to {after}")


@db.command("downgrade")
@click.option("--revision", required=True, help="Target revision (`base` drops every table).")
@db_option
@output_errors
def downgrade_cmd(revision: str, db_url: str | None) -> None:
    """Migrate the database down to a revision."""
    url = storage_db.resolve_db_url(db_url)
    with failures():
        storage_db.require_database(url)
        before = migrate.current(url)
        migrate.downgrade(url, revision)
        after = migrate.current(url)
    click.echo(f"downgraded {_shown(url)} from {before or 'base'} to {after or 'base'}")


@db.command("current")
@db_option
@json_option
@output_errors
def current_cmd(db_url: str | None, as_json: bool) -> None:
    """Show the database's revision and the newest one this version knows."""
    url = storage_db.resolve_db_url(db_url)
    with failures():
        storage_db.require_database(url)
        revision = migrate.current(url)
    head = migrate.head_revision()
    if as_json:
        shown = {"url": storage_db.display_url(url), "current": revision, "head": head}
        echo_json(shown)
        return
    state = "up to date" if revision == head else "run `moderation db upgrade`"
    _warn_if_shared(url)
    click.echo(f"{_shown(url)}: revision {revision or 'none'} (head {head}, {state})")


@db.command("replay")
@db_option
@click.option(
    "--spool",
    "spool_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Spool folder to replay (default: $MODERATION_SPOOL_DIR, else ./spool).",
)
@click.option(
    "--into-other-database",
    is_flag=True,
    help="Also replay spool files written for another database (or by an older version).",
)
@json_option
@output_errors
def replay_cmd(
    db_url: str | None, spool_dir: Path | None, into_other_database: bool, as_json: bool
) -> None:
    """Write spooled decisions into the database (idempotent) and empty the spool."""
    from moderation.storage.log import default_spool_dir

    spool_dir = spool_dir or default_spool_dir()
    refused = None
    with failures(), DecisionLog(db_url, spool_dir=spool_dir) as log:
        try:
            added = log.replay(into_other_database=into_other_database)
        except OtherDatabaseError as err:
            added, refused = log.last_replay.added, err
        discarded = list(log.spool.discarded)
        report = log.last_replay
    quarantined = report.quarantined if report else []
    # Decisions set aside by this replay or an earlier one: never a silent "replayed 0".
    waiting = count_quarantine(spool_dir)
    if as_json:
        echo_json(
            {
                "added": added,
                "discarded": discarded,
                "quarantined": quarantined,
                "other_database": report.other_database if report else [],
                "quarantine": waiting.as_json(),
            }
        )
    else:
        for line in [*discarded, *quarantined]:
            click.echo(f"warning: {clean(line)}", err=True)
        if refused is None:
            click.echo(f"replayed {added} decisions from {clean(str(spool_dir))}")
    if refused is not None:
        raise click.ClickException(clean(str(refused)))
    if not waiting.empty:
        raise click.ClickException(_quarantine_problem(waiting))


def _quarantine_problem(waiting) -> str:
    return clean(
        f"{waiting.describe()} wait in the quarantine {waiting.folder} (the database refused "
        f"them, or they could not be read): fix the cause, then `moderation db replay --spool "
        f"{waiting.folder}`"
    )


@db.command("status")
@db_option
@click.option(
    "--spool",
    "spool_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Spool folder (default: $MODERATION_SPOOL_DIR, else ./spool).",
)
@json_option
@output_errors
def status_cmd(db_url: str | None, spool_dir: Path | None, as_json: bool) -> None:
    """Show the database's revision, the decisions waiting in the spool and in its quarantine.

    Exits 1 when something needs a person: the database cannot be used, or decisions wait in
    the quarantine."""
    from moderation.storage.log import default_spool_dir

    url = storage_db.resolve_db_url(db_url)
    spool_dir = spool_dir or default_spool_dir()
    head = migrate.head_revision()
    revision, problem = None, None
    try:
        storage_db.require_database(url)
        revision = migrate.current(url)
    except StorageError as err:
        problem = str(err)
    spooled, waiting = count_folder(spool_dir), count_quarantine(spool_dir)
    if as_json:
        echo_json(
            {
                "url": storage_db.display_url(url),
                "current": revision,
                "head": head,
                "error": problem,
                "spool": spooled.as_json(),
                "quarantine": waiting.as_json(),
            }
        )
    else:
        if problem is not None:
            click.echo(f"{_shown(url)}: {clean(problem)}")
        else:
            state = "up to date" if revision == head else "run `moderation db upgrade`"
            click.echo(f"{_shown(url)}: revision {revision or 'none'} (head {head}, {state})")
        pending = "empty" if spooled.empty else f"{spooled.describe()} (`moderation db replay`)"
        click.echo(f"spool {clean(spooled.folder)}: {pending}")
        kept = "empty" if waiting.empty else waiting.describe()
        click.echo(f"quarantine {clean(waiting.folder)}: {kept}")
    problems = [p for p in (problem, None if waiting.empty else _quarantine_problem(waiting)) if p]
    if revision != head and problem is None:
        problems.insert(0, f"{storage_db.display_url(url)} is not at revision {head}")
    if problems:
        raise click.ClickException(clean("; ".join(problems)))
