"""A decision's review as its document shows it, and `review show`: the decision document
(moderation.document) of an item's decision, with the item and its history."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from moderation.kernel.logged import logged_document
from moderation.review.labels import decision_and_policy, item_labels
from moderation.review.queries import newest_item
from moderation.storage.models import ReviewEvent, ReviewItem
from moderation.times import iso, utc
from policy.vocabulary import DECIDED


def item_view(item: Any, policy: Any, decision: Any) -> dict[str, Any]:
    """One review item of a decision, as its document's `review.items` lists it."""
    return {
        "id": item.id,
        "status": item.status,
        "priority": item.priority,
        "margin": item.margin,
        "created_at": iso(item.created_at),
        "updated_at": iso(item.updated_at),
        "claim_owner": item.claim_owner,
        "reviewer": item.reviewer,
        "reason": item.reason,
        "reopened_from": item.reopened_from,
        # What the verdict says the image shows (None until a verdict): review/labels.py
        "labels": item_labels(item.status, item.labels, policy, decision),
    }


def review_section(conn: Connection, decision: Any, policy: Any) -> tuple[dict | None, dict | None]:
    """The `review` of a decision document (its items and events; None when it was never
    queued) and its `labels` (those of its latest verdict; None when none stands)."""
    items = conn.execute(
        select(ReviewItem.__table__)
        .where(ReviewItem.decision_id == decision.id)
        .order_by(ReviewItem.id)
    ).all()
    if not items:
        return None, None
    events = conn.execute(
        select(ReviewEvent.__table__)
        .where(ReviewEvent.decision_id == decision.id)
        .order_by(ReviewEvent.id)
    ).all()
    review = {
        "items": [item_view(i, policy, decision) for i in items],
        "events": [event_view(e) for e in events],
    }
    return review, decision_labels(conn, decision.id)


def explain_item(conn: Connection, item_id: int, now: datetime) -> dict[str, Any] | None:
    """The `review show` document of one item, or None when there is no such item: the decision
    document of its decision, with `item` (this item) and `events` (this item's history)."""
    item = conn.execute(select(ReviewItem.__table__).where(ReviewItem.id == item_id)).first()
    if item is None:
        return None
    shown = logged_document(conn, item.decision_id, review=review_section)
    reopened_as = conn.execute(
        select(ReviewItem.id).where(ReviewItem.reopened_from == item_id).order_by(ReviewItem.id)
    ).scalars()
    expires = item.claim_expires_at and utc(item.claim_expires_at)
    listed = next(i for i in shown["review"]["items"] if i["id"] == item_id)
    shown["item"] = {
        **listed,
        "claim_expires_at": iso(expires),
        "lease_live": expires is not None and item.status == "claimed" and now < expires,
        "reopened_as": list(reopened_as),
    }
    shown["events"] = [e for e in shown["review"]["events"] if e["item_id"] == item_id]
    return shown


def event_view(event: Any) -> dict[str, Any]:
    """One `review_events` row as JSON-ready fields."""
    return {
        "id": event.id,
        "item_id": event.item_id,
        "at": iso(event.at),
        "actor": event.actor,
        "event": event.event,
        "reason": event.reason,
        "details": event.details or {},
    }


def decision_labels(conn: Connection, decision_id: str) -> dict[str, Any] | None:
    """The labels of a decision's latest verdict, with the item they came from (None when no
    verdict stands: never reviewed, or its newest item awaits one after a reopen)."""
    columns = (ReviewItem.id, ReviewItem.status, ReviewItem.labels, ReviewItem.reviewer)
    item = conn.execute(newest_item(decision_id, *columns)).first()
    if item is None or item.status not in DECIDED:
        return None
    decision, policy = decision_and_policy(conn, decision_id)
    labels = item_labels(item.status, item.labels, policy, decision)
    return {"item_id": item.id, "verdict": item.status, "reviewer": item.reviewer, **labels}
