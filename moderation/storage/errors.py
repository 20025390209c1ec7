"""The storage error: every database or filesystem failure at the storage boundary."""

from __future__ import annotations

from moderation.errors import ModerationError


class StorageError(ModerationError):
    """A decision-log, spool, held-image or database failure, worded for people."""
