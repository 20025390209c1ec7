"""SQL decision log, review-queue tables, migrations runner, spool and held originals."""

from moderation.storage.errors import StorageError
from moderation.storage.models import (
    NAMING_CONVENTION,
    REVIEW_EVENTS,
    REVIEW_STATUSES,
    Base,
    DecisionRow,
    PolicyRow,
    ReviewEvent,
    ReviewItem,
    UTCDateTime,
    utcnow,
)
from moderation.storage.records import DecisionRecord, PolicyRecord

__all__ = [
    "NAMING_CONVENTION",
    "REVIEW_EVENTS",
    "REVIEW_STATUSES",
    "Base",
    "DecisionRecord",
    "DecisionRow",
    "PolicyRecord",
    "PolicyRow",
    "ReviewEvent",
    "ReviewItem",
    "StorageError",
    "UTCDateTime",
    "utcnow",
]
