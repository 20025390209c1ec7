"""SQLAlchemy 2.0 models of the decision log and the review queue (migrations/ creates them)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from moderation.times import utcnow
from policy.vocabulary import REVIEW_STATUSES

# Stable constraint names: Alembic batch mode on SQLite rebuilds tables and must find them by name.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

REVIEW_EVENTS = ("created", "claimed", "lease_expired", "approved", "rejected", "reopened")


def _quoted(names: tuple[str, ...]) -> str:
    """SQL string literals of `names`, for a CHECK ... IN (...) constraint."""
    return ", ".join(f"'{name}'" for name in names)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetime; stored naive-UTC on SQLite, `timestamptz` on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        # Naive values are taken as UTC: callers of this package only ever produce UTC.
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        # SQLite has no zone type; naive UTC text sorts correctly and compares with bound params.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


# JSONB on PostgreSQL (indexable, compact); plain JSON text elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")
# For optional columns: Python None is SQL NULL (not the JSON value null), on every write path.
NullableJSON = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


class Base(DeclarativeBase):
    """Declarative base with the constraint naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class PolicyRow(Base):
    """A compiled policy, stored once per digest; decisions point at it."""

    __tablename__ = "policies"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str] = mapped_column(String(500))
    compat: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(Text)
    concepts: Mapped[list] = mapped_column(
        JSONType
    )  # [{"name","category","severity","threshold","action","vector"}]
    special_concepts: Mapped[list] = mapped_column(JSONType)  # [{"name","threshold","vector"}]
    adjustment: Mapped[float] = mapped_column(Float)
    escalate: Mapped[str | None] = mapped_column(String(16))
    review_band: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DecisionRow(Base):
    """One moderation decision; arrays are little-endian bytes (float32 [C]/[S], float16 [D])."""

    __tablename__ = "decisions"
    __table_args__ = (
        Index("ix_decisions_created_at", "created_at"),
        Index("ix_decisions_policy_digest_created_at", "policy_digest", "created_at"),
        Index("ix_decisions_image_sha256", "image_sha256"),
        Index("ix_decisions_shadow_of", "shadow_of"),
    )

    id: Mapped[str] = mapped_column(
        String(36), primary_key=True
    )  # time-ordered UUID text (moderation.ids)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    policy_digest: Mapped[str] = mapped_column(String(64), ForeignKey("policies.digest"))
    model_id: Mapped[str] = mapped_column(String(500))
    image_sha256: Mapped[str | None] = mapped_column(String(64))
    verdict: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(16))
    top_concept: Mapped[str | None] = mapped_column(String(200))
    margin: Mapped[float | None] = mapped_column(Float)
    fired: Mapped[list] = mapped_column(JSONType)  # concept names
    special_hits: Mapped[list] = mapped_column(JSONType)  # special-care concept names
    adjustment: Mapped[float] = mapped_column(Float)
    cosines: Mapped[bytes] = mapped_column(LargeBinary)  # float32 LE [C]
    scores: Mapped[bytes] = mapped_column(LargeBinary)  # float32 LE [C]
    special_cosines: Mapped[bytes] = mapped_column(LargeBinary)  # float32 LE [S]
    special_scores: Mapped[bytes] = mapped_column(LargeBinary)  # float32 LE [S]
    embedding: Mapped[bytes | None] = mapped_column(
        LargeBinary
    )  # float16 LE [V, D], one row per view
    meta: Mapped[dict[str, Any]] = mapped_column(JSONType)  # prompt, seed, user, app...
    error: Mapped[str | None] = mapped_column(Text)
    held_path: Mapped[str | None] = mapped_column(Text)  # where the held original was stored
    # The views the image was judged on ([{"frame", "box"}], NULL: one view of the whole image)
    # and, per concept, which view gave its (maximum) cosine: int16 LE [C] and [S].
    views: Mapped[list | None] = mapped_column(NullableJSON)
    concept_views: Mapped[bytes | None] = mapped_column(LargeBinary)
    special_views: Mapped[bytes | None] = mapped_column(LargeBinary)
    # A shadow decision (a candidate policy scored on live traffic, never acted on) points at
    # the live decision of the same image; NULL for live decisions.
    shadow_of: Mapped[str | None] = mapped_column(String(36), ForeignKey("decisions.id"))
    # Which image encoder (moderation.encoder_identity.tower_digest: weights + preprocessing)
    # embedded the image, and how a float input was read ("0,1", "-1,1", "both"); NULL before
    # 0006, for embeddings given by the caller and (value_range) for uint8 and file inputs.
    encoder_digest: Mapped[str | None] = mapped_column(String(64))
    value_range: Mapped[str | None] = mapped_column(String(8))
    # What set the action, recorded at decision time (moderation.rule): {"rule", "concept"};
    # NULL for a decision logged before it was recorded (its document derives it).
    action_reason: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON)

    policy: Mapped[PolicyRow] = relationship()
    review_items: Mapped[list[ReviewItem]] = relationship(
        back_populates="decision", order_by="ReviewItem.id"
    )
    live: Mapped[DecisionRow | None] = relationship(remote_side="DecisionRow.id")


class ReviewItem(Base):
    """A decision waiting for (or given) a human verdict; a reopen adds a new linked item."""

    __tablename__ = "review_items"
    __table_args__ = (
        CheckConstraint(f"status IN ({_quoted(REVIEW_STATUSES)})", name="status"),
        Index("ix_review_items_decision_id", "decision_id"),
        Index("ix_review_items_created_at", "created_at"),
        Index("ix_review_items_claim_expires_at", "claim_expires_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    decision_id: Mapped[str] = mapped_column(String(36), ForeignKey("decisions.id"))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    priority: Mapped[int] = mapped_column(Integer, default=0)  # 1 = special-care escalation
    margin: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    claim_owner: Mapped[str | None] = mapped_column(String(200))
    claim_token: Mapped[str | None] = mapped_column(String(36))  # uuid text
    claim_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    reviewer: Mapped[str | None] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text)
    reopened_from: Mapped[int | None] = mapped_column(Integer, ForeignKey("review_items.id"))
    # What the reviewer said the image shows, recorded with the verdict (NULL before one).
    labels: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON)

    decision: Mapped[DecisionRow] = relationship(back_populates="review_items")


# Queue order per status: priority DESC, margin DESC, created_at ASC, id ASC (one index scan).
Index(
    "ix_review_items_queue",
    ReviewItem.status,
    ReviewItem.priority.desc(),
    ReviewItem.margin.desc(),
    ReviewItem.created_at,
    ReviewItem.id,
)


class ReviewEvent(Base):
    """Append-only audit trail of the review queue: never updated or deleted."""

    __tablename__ = "review_events"
    __table_args__ = (
        CheckConstraint(
            "event IN ('created', 'claimed', 'lease_expired', 'approved', 'rejected', 'reopened')",
            name="event",
        ),
        Index("ix_review_events_item_id", "item_id"),
        Index("ix_review_events_decision_id", "decision_id"),
        Index("ix_review_events_at", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(Integer, ForeignKey("review_items.id"))
    decision_id: Mapped[str] = mapped_column(String(36), ForeignKey("decisions.id"))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))
    event: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)


# -- the review desk (moderation/desk/): accounts, sessions, its audit, webhooks -------------------
DESK_ROLES = ("reviewer", "special-care", "admin")


class DeskUser(Base):
    """A review desk account; the password is an argon2id hash, never the password."""

    __tablename__ = "desk_users"
    __table_args__ = (
        CheckConstraint("role IN ('reviewer', 'special-care', 'admin')", name="role"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(Text)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    # The person's own settings, e.g. {"image_mode": "blur"} (NULL: the defaults).
    preferences: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DeskSession(Base):
    """A logged-in browser: the cookie holds a random token, the row only its sha256."""

    __tablename__ = "desk_sessions"
    __table_args__ = (Index("ix_desk_sessions_user_id", "user_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of the token
    user_id: Mapped[int] = mapped_column(Integer, ForeignKey("desk_users.id"))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class DeskEvent(Base):
    """Append-only audit of the desk: logins, reveals, lease renewals and releases, accounts,
    webhooks (the queue's own changes are `review_events`)."""

    __tablename__ = "desk_events"
    __table_args__ = (
        Index("ix_desk_events_at", "at"),
        Index("ix_desk_events_actor_event_at", "actor", "event", "at"),
        Index("ix_desk_events_item_id", "item_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))
    event: Mapped[str] = mapped_column(String(32))
    item_id: Mapped[int | None] = mapped_column(Integer)
    decision_id: Mapped[str | None] = mapped_column(String(36))
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)


class Webhook(Base):
    """Where verdicts are delivered; the secret stays in an environment variable, named here."""

    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    url: Mapped[str] = mapped_column(Text)
    secret_env: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebhookDelivery(Base):
    """One verdict to deliver to one webhook, written in the verdict's transaction (outbox)."""

    __tablename__ = "webhook_outbox"
    __table_args__ = (Index("ix_webhook_outbox_due", "delivered_at", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    webhook_id: Mapped[int] = mapped_column(Integer, ForeignKey("webhooks.id"))
    item_id: Mapped[int] = mapped_column(Integer)
    decision_id: Mapped[str] = mapped_column(String(36))
    body: Mapped[str] = mapped_column(Text)  # the exact JSON that is signed and sent
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)


class ApiKey(Base):
    """A key of `moderation serve`: only the sha256 of the secret is stored (the secret is a
    high-entropy random string, so a fast hash is enough); revoked keys keep their row."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # the key's first characters, to recognise it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
