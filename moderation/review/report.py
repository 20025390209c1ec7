"""Queue statistics and the decision export (JSON lines or CSV) of the review queue."""

from __future__ import annotations

import csv
import json
from datetime import datetime
from typing import IO, Any

from sqlalchemy import Connection, func, select, true

from moderation.kernel.document import document, row_facts
from moderation.kernel.logged import Prefixed
from moderation.review.explain import item_view
from moderation.review.queries import fired_concepts, newest_items
from moderation.storage.models import DecisionRow, PolicyRow, ReviewItem
from moderation.text import spreadsheet_cell
from moderation.times import iso, utc
from policy.vocabulary import DECIDED, REVIEW_STATUSES

EXPORT_FORMATS = ("jsonl", "csv")
# The CSV columns: the decision document (moderation.document) flattened, one cell per column.
# The newest review item is the decision's review; `review_*`, `reviewer` and `labels` are its.
EXPORT_FIELDS = (
    "decision_id",
    "created_at",
    "policy_name",
    "policy_version",
    "policy_digest",
    "policy_model",
    "image_sha256",
    "verdict",
    "action",
    "action_reason",
    "action_reason_concept",
    "top_concept",
    "margin",
    "fired",
    "special_care_hits",
    "special_care_adjustment",
    "scores",
    "cosines",
    "metadata",
    "error",
    "held_path",
    "review_item_id",
    "review_status",
    "reviewer",
    "review_reason",
    "reviewed_at",
    "labels",
)
# Live decisions: shadow ones (candidate policies scored on the same images, never acted on)
# are not traffic.
LIVE = DecisionRow.shadow_of.is_(None)
EXPORT_BATCH = 1000  # rows fetched per round trip; bounds memory on large logs


def _counts(conn: Connection, query: Any) -> dict[str, int]:
    return {str(key): int(n) for key, n in conn.execute(query).all()}


def _live_counts(conn: Connection, column: Any) -> dict[str, int]:
    """Live decisions counted by `column`, in its order."""
    query = select(column, func.count()).where(LIVE).group_by(column).order_by(column)
    return _counts(conn, query)


def queue_stats(conn: Connection, now: datetime) -> dict[str, Any]:
    """Queue depth per status, expired leases, oldest pending item, decisions by concept/action."""
    by_status = _counts(conn, select(ReviewItem.status, func.count()).group_by(ReviewItem.status))
    expired = conn.execute(
        select(func.count()).where(
            ReviewItem.status == "claimed", ReviewItem.claim_expires_at <= now
        )
    ).scalar_one()
    oldest = conn.execute(
        select(ReviewItem.id, ReviewItem.created_at)
        .where(ReviewItem.status == "pending")
        .order_by(ReviewItem.created_at, ReviewItem.id)
        .limit(1)
    ).first()
    names = fired_concepts(conn.dialect.name)
    by_concept = _counts(
        conn,
        select(names.c.value, func.count())
        .select_from(DecisionRow)
        .join(names, true())
        .where(LIVE)
        .group_by(names.c.value)
        .order_by(func.count().desc(), names.c.value),
    )
    total = conn.execute(select(func.count()).select_from(DecisionRow).where(LIVE)).scalar_one()
    return {
        "queue": {status: by_status.get(status, 0) for status in REVIEW_STATUSES},
        "expired_leases": int(expired),
        "oldest_pending": None
        if oldest is None
        else {
            "item_id": oldest.id,
            "created_at": iso(oldest.created_at),
            "age_seconds": round((now - utc(oldest.created_at)).total_seconds(), 3),
        },
        "decisions": {
            "total": int(total),
            "by_action": _live_counts(conn, DecisionRow.action),
            "by_verdict": _live_counts(conn, DecisionRow.verdict),
            "by_concept": by_concept,
        },
    }


def flat_row(doc: dict[str, Any]) -> dict[str, Any]:
    """The CSV row (EXPORT_FIELDS) of a decision document from `export_documents`."""
    items = (doc["review"] or {}).get("items") or [{}]
    item = items[-1]
    pol = doc["policy"]
    concepts = sorted(doc["concepts"], key=lambda c: c["index"])  # policy order
    status = item.get("status")
    return {
        "decision_id": doc["decision_id"],
        "created_at": doc["created_at"],
        "policy_name": pol["name"],
        "policy_version": pol["version"],
        "policy_digest": pol["digest"],
        "policy_model": pol["model"],
        "image_sha256": doc["image_sha256"],
        "verdict": doc["verdict"],
        "action": doc["action"],
        "action_reason": doc["action_reason"]["rule"],
        "action_reason_concept": doc["action_reason"]["concept"],
        "top_concept": doc["top_concept"],
        "margin": doc["margin"],
        "fired": doc["fired"],
        "special_care_hits": doc["special_care"]["hits"],
        "special_care_adjustment": doc["special_care"]["adjustment"],
        "scores": _named(concepts, "score"),
        "cosines": _named(concepts, "cosine"),
        "metadata": doc["metadata"],
        "error": doc["error"],
        "held_path": doc["held_path"],
        "review_item_id": item.get("id"),
        "review_status": status,
        "reviewer": item.get("reviewer"),
        "review_reason": item.get("reason"),
        "reviewed_at": item.get("updated_at") if status in DECIDED else None,
        "labels": item.get("labels"),  # what the newest item's verdict says it shows
    }


def _named(concepts: list[dict[str, Any]], key: str) -> dict[str, float]:
    # Error decisions carry no values: they are left out.
    return {c["name"]: round(c[key], 6) for c in concepts if c[key] is not None}


def export_documents(conn: Connection):
    """Yield the decision document of every live decision (oldest first), with its newest
    review item as its `review` (`items`: that one item, no events) and the labels of its
    verdict (None while no verdict stands)."""
    policies = {row.digest: row for row in conn.execute(select(PolicyRow.__table__))}
    latest = newest_items()
    item = ReviewItem.__table__
    query = (
        select(DecisionRow.__table__, *(c.label(f"item_{c.name}") for c in item.columns))
        .outerjoin(latest, latest.c.decision_id == DecisionRow.id)
        .outerjoin(item, item.c.id == latest.c.item_id)
        .where(LIVE)
        .order_by(DecisionRow.created_at, DecisionRow.id)
    )
    for row in conn.execution_options(yield_per=EXPORT_BATCH).execute(query):
        policy = policies[row.policy_digest]
        review = labels = None
        if row.item_id is not None:
            view = item_view(Prefixed(row, "item_"), policy, row)
            review = {"items": [view]}
            if view["labels"] is not None:
                labels = {
                    "item_id": view["id"],
                    "verdict": view["status"],
                    "reviewer": view["reviewer"],
                    **view["labels"],
                }
        yield document(row_facts(row, policy), review=review, labels=labels)


def _cell(value: Any) -> Any:
    """A CSV cell: text cannot start a spreadsheet formula nor hold control characters; numbers
    stay numbers (a negative margin is not a formula). JSON lines keep values exact."""
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        value = json.dumps(value, sort_keys=True)  # starts with [ or {; ensure_ascii escapes
    if isinstance(value, str):
        return spreadsheet_cell(value)
    return value


def export_decisions(conn: Connection, fmt: str, out: IO[str]) -> int:
    """Write `export_documents` to `out` as JSON lines or CSV (with a header); return the row count."""
    count = 0
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS, lineterminator="\n")
        writer.writeheader()
        for doc in export_documents(conn):
            writer.writerow({key: _cell(value) for key, value in flat_row(doc).items()})
            count += 1
    else:
        for doc in export_documents(conn):
            out.write(json.dumps(doc) + "\n")
            count += 1
    return count
