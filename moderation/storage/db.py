"""Database URLs and cached engines: SQLite pragmas and file mode, write transactions, JSON for JSON
columns, and the identity of a database (which spooled decisions belong to)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import URL, Connection, Engine, create_engine, event, exc, make_url
from sqlalchemy.pool import NullPool

from moderation.storage.errors import StorageError, display_url

DEFAULT_DB_URL = "sqlite:///moderation.db"
# Knobs: how long a SQLite writer waits for the lock, and a PostgreSQL client for a connection,
# before the database counts as unavailable (the decision log then spools).
SQLITE_BUSY_TIMEOUT_S = 5.0
PG_CONNECT_TIMEOUT_S = 5
# A new SQLite database holds prompts, users and embeddings: owner-only, like held and spool
# files. SQLite gives its -wal/-shm files the mode of the database file.
SQLITE_FILE_MODE = 0o600

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


def parse_db_url(url: str) -> URL:
    """The parsed URL; StorageError (password masked) when it is not a database URL.

    The parser's own words are never repeated when they quote the URL (an unescaped `@` in a
    password would leak the rest of it); a bare path and `sqlite://FOLDER/FILE` (two slashes:
    FOLDER would be read as a host) get a did-you-mean."""
    shown = display_url(url)
    if "://" not in url:
        hint = f"; did you mean `sqlite:///{url}`?" if _looks_like_a_path(url) else ""
        raise StorageError(f"invalid database URL {shown!r}: not a URL (BACKEND://...){hint}")
    try:
        parsed = make_url(url)
    except (exc.ArgumentError, ValueError, TypeError) as err:
        # The parser's words quote the input (`invalid literal for int(): 'w0rd@h:5999'`).
        raise StorageError(f"invalid database URL {shown!r}: {UNPARSABLE}") from err
    if "@" in (parsed.host or "") or "@" in (parsed.username or ""):
        raise StorageError(
            f"invalid database URL {shown!r}: more than one `@` before the host "
            "(percent-encode an `@` in the user name or password as %40)"
        )
    if parsed.get_backend_name() == "sqlite" and (parsed.host or parsed.port):
        path = "/".join(p for p in (parsed.host, parsed.database) if p)
        raise StorageError(
            f"invalid database URL {shown!r}: a SQLite URL has no host; did you mean "
            f"`sqlite:///{path}` (relative) or `sqlite:////{path}` (absolute)?"
        )
    return parsed


UNPARSABLE = (
    "it does not parse as BACKEND://USER:PASSWORD@HOST:PORT/DATABASE (a port that is not a "
    "number, or an `@`, `:` or `/` in a password that is not percent-encoded)"
)


def _looks_like_a_path(text: str) -> bool:
    return (
        bool(text)
        and not any(c.isspace() for c in text)
        and ":" not in text.split("/", 1)[0]
        and not text.startswith("-")
    )


def safe_reason(err: BaseException, url: str) -> str:
    """A parser's or driver's message, unless it quotes a part of the URL's user information
    (then a generic reason: the message could hold a password)."""
    text = first_line_of(err)
    authority = url.split("://", 1)[-1].split("/", 1)[0]
    secret = authority.rsplit("@", 1)[0] if "@" in authority else ""
    pieces = [p for p in re.split(r"[:@]", secret) if p]
    if any(piece in text for piece in pieces) or (secret and secret in text):
        return UNPARSABLE
    return text


def first_line_of(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases, in-memory ones and `uri=true` URLs)."""
    parsed = parse_db_url(resolve_db_url(url))
    if parsed.get_backend_name() != "sqlite" or parsed.query.get("uri"):
        return None
    if parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def require_database(url: str) -> None:
    """Refuse a SQLite URL whose file does not exist (a typo would create an empty database)."""
    path = sqlite_file(url)
    if path is not None and not path.exists():
        raise StorageError(
            f"no database at {path} ({display_url(resolve_db_url(url))}); "
            "`moderation db upgrade --db URL` creates one"
        )


def loose_mode_warning(url: str) -> str | None:
    """A warning when an existing SQLite file is readable by other users (we never chmod it)."""
    path = sqlite_file(url)
    try:
        mode = stat.S_IMODE(path.stat().st_mode) if path is not None else 0
    except OSError:
        return None
    if not mode & 0o077:
        return None
    return (
        f"{path} is readable by other users (mode {mode:04o}) and holds prompts, users and "
        f"embeddings; `chmod 600 {path}` unless that is intended"
    )


def database_identity(url: str) -> str:
    """Which database a URL reaches, without user, password, driver or options.

    SQLite: the file's absolute path; servers: backend, host, port and database name. Spooled
    decisions carry it, so that they are not replayed into another database by mistake. The same
    server reached under two names (localhost, 127.0.0.1) counts as two databases.
    """
    parsed = parse_db_url(resolve_db_url(url))
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        path = sqlite_file(url)
        where = os.path.realpath(path) if path is not None else (parsed.database or ":memory:")
        return f"sqlite:{where}"
    port = parsed.port or {"postgresql": 5432}.get(backend, "")
    return f"{backend}://{(parsed.host or '').lower()}:{port}/{parsed.database or ''}"


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


def _create_private(path: Path) -> None:
    """Create a missing database file owner-only; an existing file keeps its mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SQLITE_FILE_MODE))
    except OSError:
        pass  # exists already, or its folder is missing: SQLite reports what is wrong


def _install_sqlite_events(engine: Engine, *, foreign_keys: bool) -> None:
    """SQLite pragmas on connect, and SQLAlchemy's pysqlite recipe to own BEGIN."""
    database = sqlite_file(engine.url.render_as_string(hide_password=False))

    if database is not None:

        @event.listens_for(engine, "do_connect")
        def _before_connect(*_args: Any) -> None:
            _create_private(database)

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
    parsed = parse_db_url(url)
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
    except (exc.ArgumentError, exc.NoSuchModuleError, ImportError, ValueError, TypeError) as err:
        raise StorageError(
            f"invalid database URL {display_url(url)!r}: {safe_reason(err, url)}"
        ) from err
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
