"""The schema: Alembic migrations configured in code, and the check that a database is at head."""

from __future__ import annotations

import functools
import threading
import weakref
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, inspect

from moderation.storage import db
from moderation.storage.errors import (
    NoSchemaError,
    SchemaVersionError,
    StorageError,
    database_errors,
    display_url,
)

# Any fixed 64-bit key: PostgreSQL sessions migrating the same database queue behind it.
_PG_MIGRATION_LOCK_KEY = 0x6D6F645F6D696772


def migrations_folder() -> Path:
    """The `migrations/` package shipped next to `moderation/`."""
    import migrations

    return Path(migrations.__file__).resolve().parent


def alembic_config(url: str | None = None) -> Config:
    """An Alembic Config pointing at our migrations (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(migrations_folder()))
    if url is not None:
        # ConfigParser interpolates '%': escape it so URL-encoded passwords survive.
        config.set_main_option("sqlalchemy.url", db.resolve_db_url(url).replace("%", "%%"))
    return config


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision in `migrations/versions`."""
    head = _scripts().get_current_head()
    assert head is not None, "migrations/versions has no revisions"
    return head


def known_revisions() -> set[str]:
    """Every revision id this version of the code ships."""
    return {script.revision for script in _scripts().walk_revisions()}


def current_revision_on(conn: Connection) -> str | None:
    """The revision stamped in a database (None when it was never migrated)."""
    return MigrationContext.configure(conn).get_current_revision()


def current(url: str | None = None) -> str | None:
    """The revision of the database at `url` (None when it was never migrated)."""
    url = db.resolve_db_url(url)
    with database_errors(url), db.engine_for(url).connect() as conn:
        return current_revision_on(conn)


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision` (default: the newest)."""
    _run(url, revision, command.upgrade)


def downgrade(url: str | None = None, revision: str = "-1") -> None:
    """Migrate the database at `url` down to `revision` (`base` drops every table)."""
    _run(url, revision, command.downgrade)


def _run(url: str | None, revision: str, action) -> None:
    url = db.resolve_db_url(url)
    config = alembic_config(url)
    try:
        with (
            database_errors(url, f"migration to {revision!r}"),
            db.migration_connection(url) as conn,
        ):
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK_KEY})")
            config.attributes["connection"] = conn
            action(config, revision)
            if conn.dialect.name == "sqlite":
                _check_foreign_keys(conn)
    except CommandError as err:
        raise StorageError(f"cannot migrate {display_url(url)} to {revision!r}: {err}") from err
    finally:
        forget_checked(url)


def _check_foreign_keys(conn: Connection) -> None:
    # Batch migrations run with foreign keys off; refuse to commit a result that breaks them.
    bad = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if bad:
        raise StorageError(f"migration left {len(bad)} rows with broken foreign keys: {bad[:5]}")


# Engines whose database was found at head (a disposed engine's replacement is checked again).
_checked: weakref.WeakSet[Engine] = weakref.WeakSet()
_checked_lock = threading.Lock()


def forget_checked(url: str) -> None:
    """Make the next `get_engine(url)` check the schema again (after a migration)."""
    with _checked_lock:
        _checked.discard(db.engine_for(url))


def get_engine(url: str | None = None) -> Engine:
    """The cached engine of an existing database at head, for readers (and the review queue).

    Never creates or migrates anything: a SQLite file that does not exist, or a database that
    was never migrated, is a StorageError naming `moderation db upgrade`."""
    url = db.resolve_db_url(url)
    engine = db.engine_for(url)
    if engine not in _checked:
        db.require_database(url)  # connecting would create the SQLite file
        ensure_schema(url)
    return engine


def ensure_schema(url: str | None = None, *, migrate_fresh: bool = False) -> None:
    """Raise StorageError if the schema is not at head.

    `migrate_fresh` (the decision log, a writer) migrates a SQLite database that has no tables
    yet; readers never do. A database without any schema is a NoSchemaError (a configuration
    error: nothing is spooled for a database that never existed)."""
    url = db.resolve_db_url(url)
    engine = db.engine_for(url)
    head = head_revision()
    with database_errors(url):
        with engine.connect() as conn:
            current = current_revision_on(conn)
            fresh = current is None and not inspect(conn).get_table_names()
    if current == head or (fresh and migrate_fresh and engine.dialect.name == "sqlite"):
        if current != head:
            upgrade(url, "head")
        with _checked_lock:
            _checked.add(engine)
        return
    if current is None:
        problem = "has no schema yet" if fresh else "has tables but no migration version"
        raise NoSchemaError(
            f"database {display_url(url)} {problem}; run `moderation db upgrade --db URL` first"
        )
    if current in known_revisions():
        raise SchemaVersionError(
            f"database {display_url(url)} is at revision {current}, this version needs {head}; "
            "run `moderation db upgrade --db URL` first"
        )
    raise SchemaVersionError(
        f"database {display_url(url)} is at revision {current}, which this version of "
        "moderation does not know (written by a newer version?)"
    )
