"""SQL decision log, review-queue tables, migrations runner, spool and held originals."""

from moderation.storage.db import (
    get_engine,
    immediate_transaction,
    resolve_db_url,
)
from moderation.storage.errors import StorageError
from moderation.storage.migrate import current, downgrade, head_revision, upgrade
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
    "current",
    "downgrade",
    "get_engine",
    "head_revision",
    "immediate_transaction",
    "resolve_db_url",
    "upgrade",
    "utcnow",
]
