"""The storage error: every database or filesystem failure at the storage boundary."""

from __future__ import annotations

from moderation.errors import ModerationError


class StorageError(ModerationError):
    """A decision-log, spool, held-image or database failure, worded for people."""


class DatabaseUnavailableError(StorageError):
    """The database cannot be reached or used right now (down, refused, locked too long)."""


class SchemaVersionError(StorageError):
    """The database schema is not the revision this code needs (run `moderation db upgrade`)."""
