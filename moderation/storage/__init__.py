"""SQL decision log, review-queue tables, migrations runner, spool and held originals."""

from moderation.storage.codec import F16, F32, decision_record, decode_array
from moderation.storage.db import (
    get_engine,
    immediate_transaction,
    resolve_db_url,
)
from moderation.storage.errors import DatabaseUnavailableError, SchemaVersionError, StorageError
from moderation.storage.held import HeldStore
from moderation.storage.log import DecisionLog
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
from moderation.storage.spool import Spool

__all__ = [
    "F16",
    "F32",
    "DatabaseUnavailableError",
    "DecisionLog",
    "HeldStore",
    "SchemaVersionError",
    "Spool",
    "decision_record",
    "decode_array",
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
