"""The decision documents the desk's pages show: one adapter over the one document builder.

The item page shows `review show`'s document and the decision page `decisions show`'s, both
built by moderation.decisions.document (docs/decision-document.md), so the pages follow the
one decision document.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from moderation.decisions.browser import DecisionError, resolve_id
from moderation.decisions.document import logged_decision_document, review_item_document

__all__ = ["decision_document", "item_document"]


def item_document(conn: Connection, item_id: int, now: datetime) -> dict[str, Any] | None:
    """`review show`'s document of one review item (None: no such item)."""
    return review_item_document(conn, item_id, now=now)


def decision_document(conn: Connection, decision_id: str) -> dict[str, Any]:
    """The document of one decision, named by its full id or a unique prefix or suffix
    (moderation.decisions.browser.DecisionError otherwise, also when it is gone between the
    lookup and the read)."""
    full_id = resolve_id(conn, decision_id, "the decision log")
    try:
        return logged_decision_document(conn, full_id)
    except LookupError as err:
        raise DecisionError(f"no decision {full_id}") from err
