"""Read side of the review queue: dialect-specific SQL, UTC times, and the records a list returns."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import exists, func, literal, select
from sqlalchemy.sql.elements import ColumnElement

from moderation.storage.models import DecisionRow, PolicyRow, ReviewItem
from moderation.times import iso


def fired_concepts(dialect: str):
    """A table-valued `value` column over `decisions.fired`, one row per fired concept name."""
    if dialect == "postgresql":
        return func.jsonb_array_elements_text(DecisionRow.fired).table_valued("value")
    return func.json_each(DecisionRow.fired).table_valued("value")


def fired_contains(dialect: str, concept: str) -> ColumnElement[bool]:
    """True where `decisions.fired` names `concept` (bound as a parameter)."""
    names = fired_concepts(dialect)
    return exists(select(literal(1)).select_from(names).where(names.c.value == concept))


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


def item_view(row: Any) -> ReviewItemView:
    data = dict(row._mapping)
    data["fired"] = list(data["fired"] or [])
    return ReviewItemView(**data)
