"""The queries behind the desk's pages: the queue a reviewer may see, their claims, reopened
items, earlier verdicts on the same image, and statistics."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, exists, func, select, true

from moderation.desk.access import visible_items
from moderation.desk.sessions import Viewer
from moderation.review.queries import (
    VIEW_COLUMNS,
    ReviewItemView,
    fired_concepts,
    fired_contains,
    item_view,
    status_is,
)
from moderation.review.queue import QUEUE_ORDER
from moderation.review.report import queue_stats
from moderation.storage.models import DecisionRow, DeskEvent, PolicyRow, ReviewItem
from moderation.times import iso
from policy.vocabulary import DECIDED

PAGE = 100  # knob: rows on one queue page
EARLIER = 5  # knob: earlier verdicts on the same image shown on an item page


def _items() -> Any:
    return (
        select(*VIEW_COLUMNS)
        .join(DecisionRow, ReviewItem.decision_id == DecisionRow.id)
        .join(PolicyRow, DecisionRow.policy_digest == PolicyRow.digest)
    )


def queue_rows(
    conn: Connection,
    viewer: Viewer,
    now: datetime,
    *,
    status: str | None = "pending",
    policy: str | None = None,
    concept: str | None = None,
    limit: int = PAGE,
) -> list[ReviewItemView]:
    """Items `viewer` may see, special care first, then by margin (the claim order)."""
    query = _items().where(visible_items(viewer))
    if status:
        query = query.where(status_is(status, now))
    if policy:
        query = query.where(
            (PolicyRow.name == policy) | PolicyRow.digest.startswith(policy, autoescape=True)
        )
    if concept:
        query = query.where(fired_contains(conn.dialect.name, concept))
    rows = conn.execute(query.order_by(*QUEUE_ORDER).limit(limit))
    return [item_view(row, now) for row in rows]


def my_claims(conn: Connection, viewer: Viewer, now: datetime) -> list[ReviewItemView]:
    """The viewer's live claims in queue order."""
    query = (
        _items()
        .where(
            ReviewItem.status == "claimed",
            ReviewItem.claim_owner == viewer.name,
            ReviewItem.claim_expires_at > now,
            visible_items(viewer),
        )
        .order_by(*QUEUE_ORDER)
        .limit(PAGE)
    )
    return [item_view(row, now) for row in conn.execute(query)]


def reopened_rows(conn: Connection, viewer: Viewer, limit: int = PAGE) -> list[dict[str, Any]]:
    """Reopened items (appeals), newest first, each with the verdict it appeals."""
    parent = ReviewItem.__table__.alias("parent")
    query = (
        select(
            ReviewItem.id,
            ReviewItem.decision_id,
            ReviewItem.status,
            ReviewItem.created_at,
            ReviewItem.reviewer,
            parent.c.id.label("from_id"),
            parent.c.status.label("from_status"),
            parent.c.reviewer.label("from_reviewer"),
            parent.c.reason.label("from_reason"),
        )
        .join(parent, parent.c.id == ReviewItem.reopened_from)
        .where(visible_items(viewer))
        .order_by(ReviewItem.id.desc())
        .limit(limit)
    )
    return [dict(r._mapping) for r in conn.execute(query)]


def earlier_verdicts(conn: Connection, doc: dict[str, Any]) -> list[dict]:
    """Verdicts already given on the same image (sha256) under the same policy digest as the
    decision of `doc` (a decision document), on other decisions."""
    sha = doc.get("image_sha256")
    if not sha:
        return []
    query = (
        select(
            ReviewItem.id,
            ReviewItem.status,
            ReviewItem.reviewer,
            ReviewItem.updated_at,
            ReviewItem.labels,
            ReviewItem.reason,
            ReviewItem.decision_id,
        )
        .join(DecisionRow, ReviewItem.decision_id == DecisionRow.id)
        .where(
            DecisionRow.image_sha256 == sha,
            DecisionRow.policy_digest == doc["policy"]["digest"],
            DecisionRow.id != doc["decision_id"],
            ReviewItem.status.in_(DECIDED),
        )
        .order_by(ReviewItem.updated_at.desc(), ReviewItem.id.desc())
        .limit(EARLIER)
    )
    return [
        {**dict(r._mapping), "updated_at": iso(r.updated_at), "labels": r.labels or {}}
        for r in conn.execute(query)
    ]


def revealed(conn: Connection, viewer: Viewer, item_id: int) -> bool:
    """Whether `viewer` chose to reveal this item's image (an audited event)."""
    return bool(
        conn.execute(
            select(
                exists().where(
                    DeskEvent.item_id == item_id,
                    DeskEvent.actor == viewer.name,
                    DeskEvent.event == "reveal",
                )
            )
        ).scalar_one()
    )


def desk_stats(conn: Connection, now: datetime) -> dict[str, Any]:
    """Queue depth and age (review stats), verdicts per reviewer and per fired concept."""
    stats = queue_stats(conn, now)
    per_reviewer: dict[str, dict[str, int]] = {}
    for reviewer, status, n in conn.execute(
        select(ReviewItem.reviewer, ReviewItem.status, func.count())
        .where(ReviewItem.status.in_(DECIDED))
        .group_by(ReviewItem.reviewer, ReviewItem.status)
    ):
        per_reviewer.setdefault(reviewer or "?", {"approved": 0, "rejected": 0})[status] = int(n)
    names = fired_concepts(conn.dialect.name)
    per_concept: dict[str, dict[str, int]] = {}
    for concept, status, n in conn.execute(
        select(names.c.value, ReviewItem.status, func.count())
        .select_from(ReviewItem)
        .join(DecisionRow, ReviewItem.decision_id == DecisionRow.id)
        .join(names, true())
        .where(ReviewItem.status.in_(DECIDED))
        .group_by(names.c.value, ReviewItem.status)
    ):
        per_concept.setdefault(str(concept), {"approved": 0, "rejected": 0})[status] = int(n)
    stats["verdicts_by_reviewer"] = dict(sorted(per_reviewer.items()))
    stats["verdicts_by_concept"] = dict(sorted(per_concept.items()))
    return stats
