"""Read-side records of the review queue: a claim, and one row of `review list`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from moderation.review_sql import iso
from moderation.storage.models import DecisionRow, PolicyRow, ReviewItem


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
