"""Database URLs and cached engines: SQLite pragmas, write transactions, JSON for JSON columns."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, create_engine, event, exc, make_url
from sqlalchemy.pool import NullPool

from moderation.storage.errors import StorageError, display_url

DEFAULT_DB_URL = "sqlite:///moderation.db"
# Knobs: how long a SQLite writer waits for the lock, and a PostgreSQL client for a connection,
# before the database counts as unavailable (the decision log then spools).
SQLITE_BUSY_TIMEOUT_S = 5.0
PG_CONNECT_TIMEOUT_S = 5

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def resolve_db_url(url: str | None = None) -> str:
    """The explicit URL, else `MODERATION_DB_URL`, else `sqlite:///moderation.db`."""
    url = url or os.environ.get("MODERATION_DB_URL") or DEFAULT_DB_URL
    # psycopg 3 is the only PostgreSQL driver we ship with; a bare scheme would pick psycopg2.
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            url = "postgresql+psycopg://" + url[len(bare) :]
    return url


def _json_default(value: Any) -> Any:
    # Callers put numpy scalars (seeds, scores) into `meta`; store them as plain JSON values.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# One encoder, built once: json.dumps(default=...) would build a new one per value (hot path).
# NaN/Infinity are refused: PostgreSQL's jsonb rejects them, so SQLite must not accept them either.
_encoder = json.JSONEncoder(
    default=_json_default, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def json_dumps(value: Any) -> str:
    """JSON text for a JSON column or the spool (numpy values become plain numbers/lists)."""
    return _encoder.encode(value)


def _install_sqlite_events(engine: Engine, *, foreign_keys: bool) -> None:
    """SQLite pragmas on connect, and SQLAlchemy's pysqlite recipe to own BEGIN."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (the pysqlite driver's own BEGIN is unreliable).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        if engine.url.database not in (None, "", ":memory:"):
            cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = FULL")
        cur.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # `sqlite_begin="IMMEDIATE"` takes the write lock up front: claims never fail mid-way.
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _make_engine(url: str, *, migration: bool = False) -> Engine:
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"json_serializer": json_dumps}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
    elif parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
        kwargs["pool_pre_ping"] = True
    if migration:
        kwargs["poolclass"] = NullPool
    try:
        engine = create_engine(parsed, **kwargs)
    except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as err:
        raise StorageError(f"invalid database URL {display_url(url)!r}: {err}") from err
    if parsed.get_backend_name() == "sqlite":
        # Batch migrations rebuild tables; foreign keys must be off while they do (SQLite docs).
        _install_sqlite_events(engine, foreign_keys=not migration)
    return engine


def engine_for(url: str | None = None) -> Engine:
    """The cached engine for a URL, without touching the database (no schema check)."""
    url = resolve_db_url(url)
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = _make_engine(url)
        return engine


def dispose(url: str | None = None) -> None:
    """Close and forget the cached engine of a URL (e.g. before dropping its database)."""
    url = resolve_db_url(url)
    with _lock:
        engine = _engines.pop(url, None)
    if engine is not None:
        engine.dispose()


@contextlib.contextmanager
def immediate_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection inside a write transaction: `BEGIN IMMEDIATE` on SQLite, plain on others."""
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            conn = conn.execution_options(sqlite_begin="IMMEDIATE")
        with conn.begin():
            yield conn


@contextlib.contextmanager
def migration_connection(url: str) -> Iterator[Connection]:
    """A one-off connection for migrations (SQLite: foreign keys off, write lock held)."""
    engine = _make_engine(resolve_db_url(url), migration=True)
    try:
        with immediate_transaction(engine) as conn:
            yield conn
    finally:
        engine.dispose()
