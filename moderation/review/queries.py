"""Read side of the review queue: dialect-specific SQL, UTC times, and the records a list returns."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, exists, func, literal, or_, select
from sqlalchemy.sql.elements import ColumnElement

from moderation.storage.models import DecisionRow, PolicyRow, ReviewItem
from moderation.times import iso, utc


def fired_concepts(dialect: str):
    """A table-valued `value` column over `decisions.fired`, one row per fired concept name."""
    if dialect == "postgresql":
        return func.jsonb_array_elements_text(DecisionRow.fired).table_valued("value")
    return func.json_each(DecisionRow.fired).table_valued("value")


def fired_contains(dialect: str, concept: str) -> ColumnElement[bool]:
    """True where `decisions.fired` names `concept` (bound as a parameter)."""
    names = fired_concepts(dialect)
    return exists(select(literal(1)).select_from(names).where(names.c.value == concept))


def claimable_at(now: datetime, special_care: bool = True) -> Any:
    """Items `claim` may take at `now`: pending, or claimed with an expired lease (without
    `special_care`, none that a special-care concept escalated: priority 1)."""
    claimable = or_(
        ReviewItem.status == "pending",
        and_(ReviewItem.status == "claimed", ReviewItem.claim_expires_at <= now),
    )
    return claimable if special_care else and_(claimable, ReviewItem.priority < 1)


def status_is(status: str, now: datetime) -> Any:
    """Items whose status is `status` as a reviewer sees it at `now`: a claim whose lease
    expired is pending again."""
    if status == "pending":
        return claimable_at(now)
    if status == "claimed":
        return and_(ReviewItem.status == "claimed", ReviewItem.claim_expires_at > now)
    return ReviewItem.status == status


def newest_items() -> Any:
    """Per reviewed decision, the id of its newest review item (a reopen adds a newer one):
    a subquery with columns `decision_id` and `item_id`."""
    return (
        select(ReviewItem.decision_id, func.max(ReviewItem.id).label("item_id"))
        .group_by(ReviewItem.decision_id)
        .subquery()
    )


@dataclass(frozen=True)
class Claim:
    """A lease on one review item: decide it with `token` before `expires_at`."""

    item_id: int
    decision_id: str
    token: str
    expires_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {**plain(self), "expires_at": iso(self.expires_at)}


@dataclass(frozen=True)
class ReviewItemView:
    """One review item with the decision and policy fields a reviewer scans a list by."""

    id: int
    decision_id: str
    status: str
    priority: int
    margin: float
    created_at: datetime
    updated_at: datetime
    claim_owner: str | None
    claim_expires_at: datetime | None
    reviewer: str | None
    reason: str | None
    reopened_from: int | None
    policy_name: str
    policy_version: str
    policy_digest: str
    verdict: str
    action: str
    top_concept: str | None
    fired: list[str]
    image_sha256: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (times as ISO 8601 UTC)."""
        out = plain(self)
        for key in ("created_at", "updated_at", "claim_expires_at"):
            out[key] = iso(out[key])
        return out


def plain(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


VIEW_COLUMNS = (
    ReviewItem.id,
    ReviewItem.decision_id,
    ReviewItem.status,
    ReviewItem.priority,
    ReviewItem.margin,
    ReviewItem.created_at,
    ReviewItem.updated_at,
    ReviewItem.claim_owner,
    ReviewItem.claim_expires_at,
    ReviewItem.reviewer,
    ReviewItem.reason,
    ReviewItem.reopened_from,
    PolicyRow.name.label("policy_name"),
    PolicyRow.version.label("policy_version"),
    PolicyRow.digest.label("policy_digest"),
    DecisionRow.verdict,
    DecisionRow.action,
    DecisionRow.top_concept,
    DecisionRow.fired,
    DecisionRow.image_sha256,
)


def item_view(row: Any, now: datetime | None = None) -> ReviewItemView:
    """A list row; with `now`, a claim whose lease has expired shows as `pending` (its lapsed
    owner and expiry stay visible)."""
    data = dict(row._mapping)
    data["fired"] = list(data["fired"] or [])
    expires = data["claim_expires_at"]
    if now is not None and data["status"] == "claimed" and expires is not None:
        if utc(expires) <= now:
            data["status"] = "pending"
    return ReviewItemView(**data)


def newest_item(decision_id: Any, *columns: Any) -> Select:
    """`columns` of a decision's newest review item (the one whose verdict stands, or that
    awaits one after a reopen); `decision_id` a value or a column (for a subquery)."""
    return (
        select(*columns)
        .where(ReviewItem.decision_id == decision_id)
        .order_by(ReviewItem.id.desc())
        .limit(1)
    )
