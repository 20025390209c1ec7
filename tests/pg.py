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
    """The URL of a database that does not exist yet (so it is unreachable), and a function
    that creates and migrates it: an outage and its end under one URL. Dropped at the end."""
    from moderation.storage import upgrade

    server = make_url(db.resolve_db_url(server_url))
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    url = server.set(database=name).render_as_string(hide_password=False)
    admin = create_engine(server, isolation_level="AUTOCOMMIT")

    def create() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        upgrade(url)

    try:
        yield url, create
    finally:
        db.dispose(url)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
