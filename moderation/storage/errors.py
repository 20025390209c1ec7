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


# `user:password@` of a URL that does not even parse, and `password=` style query parameters.
_USERINFO_PASSWORD = re.compile(r"(//[^/@:]*:)[^@/]*@")
_QUERY_PASSWORD = re.compile(r"([?&](?:password|passwd|pwd|sslpassword)=)[^&]*", re.IGNORECASE)


def display_url(url: str) -> str:
    """The URL with any password hidden (in the user part and in the query), for messages."""
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except (exc.ArgumentError, ValueError, TypeError):
        shown = _USERINFO_PASSWORD.sub(r"\1***@", str(url))
    return _QUERY_PASSWORD.sub(r"\1***", shown)


def first_line(err: BaseException) -> str:
    """The first line of a driver error (SQLAlchemy wraps it in `orig`)."""
    orig = getattr(err, "orig", None) or err
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


def unavailable(url: str, err: BaseException) -> DatabaseUnavailableError:
    """The error for a database that cannot be reached or used right now."""
    return DatabaseUnavailableError(f"cannot reach database {display_url(url)}: {first_line(err)}")


@contextlib.contextmanager
def database_errors(
    url: str, doing: str | None = None, *, refused_hint: str = ""
) -> Iterator[None]:
    """Turn SQLAlchemy errors into StorageError (DatabaseUnavailableError when the DB is down).

    `doing` names the operation for the message ("migration to 'head'"), `refused_hint` is added
    when the database refuses rows (a constraint); the URL is shown with its password masked.
    Every storage and review module goes through here.
    """
    where = display_url(url)
    try:
        yield
    except UNAVAILABLE_ERRORS as err:
        raise unavailable(url, err) from err
    except exc.IntegrityError as err:
        what = f"{doing} on {where}" if doing else f"database {where}"
        raise StorageError(f"{what} refused the rows: {first_line(err)}{refused_hint}") from err
    except exc.SQLAlchemyError as err:
        what = f"{doing} on {where}" if doing else f"database {where}"
        raise StorageError(f"{what} failed: {first_line(err)}") from err
