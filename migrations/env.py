"""Alembic environment: our models' metadata, batch mode on SQLite, connection from the caller."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from moderation.storage import db
from moderation.storage.models import Base

config = context.config
target_metadata = Base.metadata
if config.config_file_name is not None:  # the plain `alembic -c migrations/alembic.ini` CLI
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        **kwargs,
    )


def run_offline() -> None:
    """Emit SQL text instead of running it (`alembic upgrade --sql`)."""
    url = db.resolve_db_url(config.get_main_option("sqlalchemy.url") or None)
    _configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def _run_on(conn: Connection) -> None:
    _configure(connection=conn, render_as_batch=conn.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Run on the caller's connection (moderation.storage.schema) or open one (alembic CLI)."""
    conn = config.attributes.get("connection")
    if conn is not None:
        _run_on(conn)
        return
    url = db.resolve_db_url(config.get_main_option("sqlalchemy.url") or None)
    with db.migration_connection(url) as conn:
        _run_on(conn)


if context.is_offline_mode():
    run_offline()
else:
    run_online()
