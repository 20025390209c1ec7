"""Who may see what: special-care items (escalated by a special-care concept, priority 1) exist
only for the special-care role; for everyone else they are indistinguishable from missing."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, exists, select, true
from sqlalchemy.sql.elements import ColumnElement

from moderation.desk.sessions import Viewer
from moderation.storage.models import DecisionRow, ReviewItem


def visible_items(viewer: Viewer) -> ColumnElement[bool]:
    """A WHERE clause over review_items: the items `viewer` may see."""
    if viewer.special_care:
        return true()
    return ReviewItem.priority < 1


def visible_item(conn: Connection, viewer: Viewer, item_id: int) -> Any | None:
    """The review_items row, or None when it does not exist or `viewer` may not see it."""
    return conn.execute(
        select(ReviewItem.__table__).where(ReviewItem.id == item_id, visible_items(viewer))
    ).first()


def decision_visible(conn: Connection, viewer: Viewer, decision_id: str) -> bool:
    """Whether `viewer` may see a decision: not special-care escalated, or viewer has the role."""
    if viewer.special_care:
        return True
    special = conn.execute(
        select(DecisionRow.special_hits).where(DecisionRow.id == decision_id)
    ).scalar_one_or_none()
    if special:
        return False
    escalated = conn.execute(
        select(exists().where(ReviewItem.decision_id == decision_id, ReviewItem.priority >= 1))
    ).scalar_one()
    return not escalated
