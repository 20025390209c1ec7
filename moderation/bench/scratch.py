"""Scratch PostgreSQL databases: created with a unique name, dropped afterwards.

`moderation bench` writes its logging measurements into one, so a benchmark never touches a
deployment's data; the tests use them so that test modules never collide.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

from sqlalchemy import create_engine, make_url, text

from moderation.storage import db


@contextlib.contextmanager
def temporary_pg_database(server_url: str, prefix: str = "moderation_test") -> Iterator[str]:
    """Create a uniquely named database on the server, yield its URL, then drop it."""
    server = make_url(db.resolve_db_url(server_url))
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = server.set(database=name).render_as_string(hide_password=False)
        try:
            yield url
        finally:
            db.dispose(url)
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
