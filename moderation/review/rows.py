"""Row helpers of the review queue's write side: the locked item, and audit event rows."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from moderation.review.rules import ReviewError, check_item_id
from moderation.storage.models import ReviewItem


def event_row(
    item: Any, at: datetime, actor: str, event: str, reason: str | None, details: dict
) -> dict[str, Any]:
    """A `review_events` row about `item` (append-only: never updated)."""
    return {
        "item_id": item.id,
        "decision_id": item.decision_id,
        "at": at,
        "actor": actor,
        "event": event,
        "reason": reason,
        "details": details,
    }


def locked_item(conn: Connection, item_id: int) -> Any:
    """The item row, locked until commit (PostgreSQL; SQLite already holds the write lock)."""
    check_item_id(item_id)
    row = conn.execute(
        select(ReviewItem.__table__).where(ReviewItem.id == item_id).with_for_update()
    ).first()
    if row is None:
        raise ReviewError(f"item {item_id}: no such review item")
    return row
