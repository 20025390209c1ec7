"""The storage errors, and the one place where SQLAlchemy errors become them."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator

from sqlalchemy import exc, make_url

from moderation.errors import ModerationError

# Errors that mean "the database cannot be reached or used right now", as opposed to bad data.
UNAVAILABLE_ERRORS = (exc.OperationalError, exc.InterfaceError, exc.TimeoutError)


class StorageError(ModerationError):
    """A decision-log, spool, held-image or database failure, worded for people."""


class DatabaseUnavailableError(StorageError):
    """The database cannot be reached or used right now (down, refused, locked too long)."""


class SchemaVersionError(StorageError):
    """The database schema is not the revision this code needs (run `moderation db upgrade`)."""


class DatabaseConfigurationError(StorageError):
    """The database named cannot be used as configured: it does not exist, authentication
    failed, the URL is wrong, it was never migrated. Retrying or spooling would not help:
    writers fail at once with the server's reason and spool nothing."""


class NoSchemaError(SchemaVersionError, DatabaseConfigurationError):
    """The database exists but was never migrated (no tables, no revision)."""


class UnrecordedError(StorageError):
    """Decisions that could be kept neither in the database nor in the spool (`decision_ids`)."""

    def __init__(self, message: str, decision_ids: Iterable[str]) -> None:
        super().__init__(message)
        self.decision_ids = list(decision_ids)


class PartlyRecordedError(StorageError):
    """Decisions that are recorded, but not as they should be: kept in the spool because the
    database refused them (or has the wrong schema), or written without their held original."""

    def __init__(self, message: str, decision_ids: Iterable[str]) -> None:
        super().__init__(message)
        self.decision_ids = list(decision_ids)


class OtherDatabaseError(StorageError):
    """A replay left spool files that were written for another database."""


# The authority of a URL (between `scheme://` and the first `/`, `?` or `#`), and `password=`
# style query parameters.
_AUTHORITY = re.compile(r"^(?P<scheme>[^:/?#]*://)(?P<authority>[^/?#]*)(?P<rest>.*)$", re.DOTALL)
_QUERY_PASSWORD = re.compile(r"([?&](?:password|passwd|pwd|sslpassword)=)[^&]*", re.IGNORECASE)


def _mask_authority(url: str) -> str:
    """Everything between the scheme and the last `@` of the authority as `***` (a URL that
    does not parse as we expect: an unescaped `@` in a password must not leak any part of it)."""
    match = _AUTHORITY.match(url)
    if match is None:
        return url if "@" not in url else "***@" + url.rsplit("@", 1)[1]
    authority = match["authority"]
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    return f"{match['scheme']}{authority}{match['rest']}"


def display_url(url: str) -> str:
    """The URL with any password hidden (in the user part and in the query), for messages.

    A URL that does not parse, or parses with an `@` left in its host (an unescaped `@` in the
    password), shows nothing between its scheme and the last `@` of its authority."""
    url = str(url)
    try:
        parsed = make_url(url)
        if "@" in (parsed.host or "") or "@" in (parsed.username or ""):
            raise ValueError("unescaped @")
        shown = parsed.render_as_string(hide_password=True)
    except (exc.ArgumentError, ValueError, TypeError):
        shown = _mask_authority(url)
    return _QUERY_PASSWORD.sub(r"\1***", shown)


def first_line(err: BaseException) -> str:
    """The first line of a driver error (SQLAlchemy wraps it in `orig`)."""
    orig = getattr(err, "orig", None) or err
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


def unavailable(url: str, err: BaseException) -> DatabaseUnavailableError:
    """The error for a database that cannot be reached or used right now."""
    return DatabaseUnavailableError(f"cannot reach database {display_url(url)}: {first_line(err)}")


def misconfigured(url: str, err: BaseException) -> DatabaseConfigurationError:
    """The error for a database that cannot be used as configured (the server's reason)."""
    return DatabaseConfigurationError(
        f"cannot use database {display_url(url)}: {first_line(err)} (check --db or "
        "MODERATION_DB_URL)"
    )


# PostgreSQL SQLSTATEs (https://www.postgresql.org/docs/current/errcodes-appendix.html) of a
# server that cannot take writes *right now*: a standby or a database set read-only (25006),
# a shutdown or a restart (class 57), too many connections and other exhausted resources (53),
# lost connections (08), serialization failures and deadlocks (40), lock timeouts (55P03).
# Decisions then wait in the spool; they are never quarantined as "refused" for these.
_PG_TRANSIENT_CLASSES = ("08", "40", "53", "57", "58")
_PG_TRANSIENT = frozenset({"25006", "55P03", "55006", "25P03", "25P04"})
# ...and those of a configuration that cannot work: no such database, authentication failed,
# not allowed (invalid_catalog_name, class 28, insufficient_privilege, invalid schema name).
_PG_CONFIGURATION_CLASSES = ("28",)
_PG_CONFIGURATION = frozenset({"3D000", "42501", "3F000"})
# libpq reports connection failures without a SQLSTATE, in the server's words.
_PG_CONFIGURATION_TEXT = re.compile(
    r'database "[^"]*" does not exist|role "[^"]*" does not exist|authentication failed'
    r"|no pg_hba\.conf entry|permission denied for database|is not permitted to log in",
    re.IGNORECASE,
)
# SQLite's result codes: busy/locked/read-only/disk full/I/O error/cannot open are states of
# the file that pass (another writer, a full disk, a file made read-only, a volume not mounted
# yet); a file that is not a database means the URL names the wrong thing.
_SQLITE_TRANSIENT = frozenset({5, 6, 8, 10, 13, 14})  # BUSY LOCKED READONLY IOERR FULL CANTOPEN
_SQLITE_CONFIGURATION = frozenset({26})  # NOTADB


def classify(err: BaseException) -> str | None:
    """ "unavailable" (a passing state of the server: keep spooling), "configuration" (the URL,
    the credentials or the database are wrong: fail at once) or None (anything else, e.g. a
    refused row), from a SQLAlchemy error's driver exception."""
    orig = getattr(err, "orig", None) or err
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str) and len(sqlstate) == 5:
        if sqlstate in _PG_CONFIGURATION or sqlstate.startswith(_PG_CONFIGURATION_CLASSES):
            return "configuration"
        if sqlstate in _PG_TRANSIENT or sqlstate.startswith(_PG_TRANSIENT_CLASSES):
            return "unavailable"
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        if code & 0xFF in _SQLITE_CONFIGURATION:
            return "configuration"
        if code & 0xFF in _SQLITE_TRANSIENT:
            return "unavailable"
    if isinstance(err, UNAVAILABLE_ERRORS):
        if _PG_CONFIGURATION_TEXT.search(str(orig)):
            return "configuration"
        return "unavailable"
    return None


@contextlib.contextmanager
def database_errors(
    url: str, doing: str | None = None, *, refused_hint: str = ""
) -> Iterator[None]:
    """Turn SQLAlchemy errors into StorageError: DatabaseUnavailableError when the database is
    down or cannot take writes right now (`classify`), DatabaseConfigurationError when it cannot
    work as configured.

    `doing` names the operation for the message ("migration to 'head'"), `refused_hint` is added
    when the database refuses rows (a constraint); the URL is shown with its password masked.
    Every storage and review module goes through here.
    """
    where = display_url(url)
    try:
        yield
    except exc.SQLAlchemyError as err:
        kind = classify(err)
        if kind == "configuration":
            raise misconfigured(url, err) from err
        if kind == "unavailable":
            raise unavailable(url, err) from err
        what = f"{doing} on {where}" if doing else f"database {where}"
        if isinstance(err, exc.IntegrityError):
            raise StorageError(f"{what} refused the rows: {first_line(err)}{refused_hint}") from err
        raise StorageError(f"{what} failed: {first_line(err)}") from err
