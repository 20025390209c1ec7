"""The decision document, one JSON shape wherever a decision is read (docs/decision-document.md).

Public entry points (the CLI, the HTTP API and the web desk call these):

- `decision_document(decision, *, recorded=None, top=None)`: the document of a live
  `Decision` (what `check --json` prints). `recorded`: whether it is in the database or the
  spool, a bool for this decision (shadows inherit it) or a callable `Decision -> bool`; None
  when unknown. `top`: list only the N nearest concepts (default: every concept).
- `logged_decision_document(conn, decision_id, *, top=None)`: the document of a logged
  decision (full id), with its review items, events and labels, and its shadow decisions;
  `conn` is a SQLAlchemy Connection or Session. LookupError when there is no such decision.
- `review_item_document(conn, item_id, *, now=None)`: `review show`'s document: the
  decision's document plus `item` (the review item shown) and `events` (that item's history);
  None when there is no such item.

The shape is documented in docs/decision-document.md and docs/decision.schema.json. The
builder itself is moderation.kernel.document (below the review package, which uses it too).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from moderation.kernel.document import live_document
from moderation.kernel.logged import logged_document
from moderation.review.explain import explain_item, review_section

if TYPE_CHECKING:
    from moderation.decision import Decision

__all__ = ["decision_document", "logged_decision_document", "review_item_document"]


def decision_document(
    decision: Decision,
    *,
    recorded: bool | Callable[[Decision], bool] | None = None,
    top: int | None = None,
) -> dict[str, Any]:
    """The document of a live decision, with its shadow decisions' summaries."""
    return live_document(decision, recorded=recorded, top=top)


def logged_decision_document(conn: Any, decision_id: str, *, top: int | None = None) -> dict:
    """The document of a logged decision; LookupError when the log has no such decision."""
    found = logged_document(conn, decision_id, top=top, review=review_section)
    if found is None:
        raise LookupError(f"no decision {decision_id}")
    return found


def review_item_document(
    conn: Any, item_id: int, *, now: datetime | None = None
) -> dict[str, Any] | None:
    """`review show`'s document of review item `item_id` (None: no such item)."""
    from moderation.times import utcnow

    return explain_item(conn, item_id, now or utcnow())
