"""Test helpers: the PostgreSQL server of the tests, and databases created later (outages)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import create_engine, make_url, text

from moderation.bench.scratch import temporary_pg_database
from moderation.storage import db

__all__ = [
    "BACKENDS",
    "pg_database_later",
    "pg_test_url",
    "scratch_url",
    "temporary_pg_database",
]

PG_ENV = "MODERATION_TEST_PG_URL"

# Parametrise a database fixture over both backends (`-m "not postgres"` leaves PostgreSQL out).
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def pg_test_url() -> str | None:
    """The PostgreSQL server named by `MODERATION_TEST_PG_URL`, if set."""
    url = os.environ.get(PG_ENV)
    return db.resolve_db_url(url) if url else None


@contextlib.contextmanager
def pg_database_later(
    server_url: str, prefix: str = "moderation_later"
) -> Iterator[tuple[str, Callable[[], None]]]:
    """The URL of a database that takes no connections yet (an outage: `ALLOW_CONNECTIONS
    false`, as an operator's maintenance sets it), and a function that opens and migrates it:
    an outage and its end under one URL. Dropped at the end. (A database that does not exist
    is not an outage but a configuration error: nothing is spooled for it.)"""
    from moderation.storage import upgrade

    server = make_url(db.resolve_db_url(server_url))
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    url = server.set(database=name).render_as_string(hide_password=False)
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" ALLOW_CONNECTIONS false'))

    def create() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        upgrade(url)

    try:
        yield url, create
    finally:
        db.dispose(url)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def scratch_url(
    backend: str,
    folder,
    name: str,
    shared: Callable[[], str] | None = None,
    *,
    migrate: bool = True,
) -> Iterator[str]:
    """An empty database of `backend` for one test: a SQLite file `name`.db in `folder`
    (migrated at once unless `migrate` is False: readers such as ReviewQueue open existing
    databases only), or a migrated PostgreSQL database on the test server, made for
    the test and dropped after it, or, with `shared` (a function giving the URL of a migrated
    database kept for a module), that one emptied. Skips without MODERATION_TEST_PG_URL."""
    if backend == "sqlite":
        url = f"sqlite:///{folder}/{name}.db"
        if migrate:
            from moderation.storage import upgrade

            upgrade(url)
        try:
            yield url
        finally:
            db.dispose(url)
        return
    if shared is not None:
        url = shared()
        with db.engine_for(url).begin() as conn:
            conn.exec_driver_sql(
                "TRUNCATE review_events, review_items, decisions, policies RESTART IDENTITY"
            )
        yield url
        return
    server = pg_test_url()
    if server is None:
        pytest.skip(f"{PG_ENV} is not set")
    from moderation.storage import upgrade

    with temporary_pg_database(server, name) as url:
        upgrade(url)
        yield url
