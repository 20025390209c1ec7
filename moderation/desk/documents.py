"""The decision documents the desk's pages show: one adapter over the read side.

The item page shows `review show`'s document and the decision page `decisions show`'s; both
come from here, so that the pages follow the one decision document wherever it lives.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from moderation.review.decisions import explain_decision, resolve_id
from moderation.review.explain import explain_item


def item_document(conn: Connection, item_id: int, now: datetime) -> dict[str, Any] | None:
    """The explanation of one review item (None: no such item)."""
    return explain_item(conn, item_id, now)


def decision_document(conn: Connection, decision_id: str) -> dict[str, Any]:
    """The explanation of one decision, named by its full id or a unique prefix
    (moderation.review.decisions.DecisionError otherwise)."""
    return explain_decision(conn, resolve_id(conn, decision_id, "the decision log"))
