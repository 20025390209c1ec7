"""SQL decision log, review-queue tables, migrations, spool and held originals.

One module per job: `db` (URLs, engines, transactions), `schema` (migrations and the schema check),
`models` (tables), `records` (what the engine hands over, and its rows), `storable` (what every
backend can store), `inserts` (batched writes), `spool` and `spool_format` (the local fallback),
`replay` (spool -> database, with quarantine), `held` (held originals), `log` (DecisionLog),
`background` (BackgroundDecisionLog) and `errors` (the one SQLAlchemy-error wrapper).
"""

from moderation.storage.db import immediate_transaction, resolve_db_url
from moderation.storage.errors import (
    DatabaseUnavailableError,
    OtherDatabaseError,
    PartlyRecordedError,
    SchemaVersionError,
    StorageError,
    UnrecordedError,
    database_errors,
    display_url,
)
from moderation.storage.held import HeldStore
from moderation.storage.log import DecisionLog, LogCounts
from moderation.storage.models import (
    NAMING_CONVENTION,
    REVIEW_EVENTS,
    Base,
    DecisionRow,
    PolicyRow,
    ReviewEvent,
    ReviewItem,
    UTCDateTime,
    utcnow,
)
from moderation.storage.records import (
    F16,
    F32,
    DecisionRecord,
    PolicyRecord,
    decode_array,
    record_from_row,
)
from moderation.storage.schema import current, downgrade, get_engine, head_revision, upgrade
from moderation.storage.spool import Spool

__all__ = [
    "F16",
    "F32",
    "NAMING_CONVENTION",
    "REVIEW_EVENTS",
    "Base",
    "DatabaseUnavailableError",
    "DecisionLog",
    "DecisionRecord",
    "DecisionRow",
    "HeldStore",
    "LogCounts",
    "OtherDatabaseError",
    "PartlyRecordedError",
    "PolicyRecord",
    "PolicyRow",
    "ReviewEvent",
    "ReviewItem",
    "SchemaVersionError",
    "Spool",
    "StorageError",
    "UTCDateTime",
    "UnrecordedError",
    "current",
    "database_errors",
    "decode_array",
    "display_url",
    "downgrade",
    "get_engine",
    "head_revision",
    "immediate_transaction",
    "record_from_row",
    "resolve_db_url",
    "upgrade",
    "utcnow",
]
