"""Queue statistics and the decision export (JSON lines or CSV) of the review queue."""

from __future__ import annotations

import csv
import json
from datetime import datetime
from typing import IO, Any

from sqlalchemy import Connection, func, select, true

from moderation.review.explain import floats
from moderation.review.labels import item_labels
from moderation.review.queries import fired_concepts, iso, newest_items, utc
from moderation.storage.models import DecisionRow, PolicyRow, ReviewItem
from moderation.text import spreadsheet_cell
from policy.vocabulary import DECIDED, REVIEW_STATUSES

EXPORT_FORMATS = ("jsonl", "csv")
EXPORT_FIELDS = (
    "decision_id",
    "created_at",
    "policy_name",
    "policy_version",
    "policy_digest",
    "model_id",
    "image_sha256",
    "verdict",
    "action",
    "top_concept",
    "margin",
    "fired",
    "special_hits",
    "adjustment",
    "scores",
    "cosines",
    "meta",
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
            "by_action": _counts(
                conn,
                select(DecisionRow.action, func.count())
                .where(LIVE)
                .group_by(DecisionRow.action)
                .order_by(DecisionRow.action),
            ),
            "by_verdict": _counts(
                conn,
                select(DecisionRow.verdict, func.count())
                .where(LIVE)
                .group_by(DecisionRow.verdict)
                .order_by(DecisionRow.verdict),
            ),
            "by_concept": by_concept,
        },
    }


def _named(names: list[str], values: list[float]) -> dict[str, float]:
    # Error decisions carry empty arrays: zip stops at the shorter side on purpose.
    return {name: round(value, 6) for name, value in zip(names, values, strict=False)}


def export_rows(conn: Connection):
    """Yield one dict per live decision (oldest first) with its newest review item's status
    and the labels of its verdict (None while no verdict stands)."""
    policies = {
        row.digest: row
        for row in conn.execute(
            select(
                PolicyRow.digest,
                PolicyRow.name,
                PolicyRow.concepts,
                PolicyRow.special_concepts,
                PolicyRow.review_band,
            )
        )
    }
    concept_names = {d: [c.get("name") for c in p.concepts or []] for d, p in policies.items()}
    latest = newest_items()
    query = (
        select(
            DecisionRow.__table__,
            PolicyRow.name.label("policy_name"),
            PolicyRow.version.label("policy_version"),
            ReviewItem.id.label("review_item_id"),
            ReviewItem.status.label("review_status"),
            ReviewItem.reviewer.label("reviewer"),
            ReviewItem.reason.label("review_reason"),
            ReviewItem.updated_at.label("review_updated_at"),
            ReviewItem.labels.label("review_labels"),
        )
        .join(PolicyRow, DecisionRow.policy_digest == PolicyRow.digest)
        .outerjoin(latest, latest.c.decision_id == DecisionRow.id)
        .outerjoin(ReviewItem, ReviewItem.id == latest.c.item_id)
        .where(LIVE)
        .order_by(DecisionRow.created_at, DecisionRow.id)
    )
    for row in conn.execution_options(yield_per=EXPORT_BATCH).execute(query):
        policy, names = policies[row.policy_digest], concept_names[row.policy_digest]
        yield {
            "decision_id": row.id,
            "created_at": iso(row.created_at),
            "policy_name": row.policy_name,
            "policy_version": row.policy_version,
            "policy_digest": row.policy_digest,
            "model_id": row.model_id,
            "image_sha256": row.image_sha256,
            "verdict": row.verdict,
            "action": row.action,
            "top_concept": row.top_concept,
            "margin": row.margin,
            "fired": list(row.fired or []),
            "special_hits": list(row.special_hits or []),
            "adjustment": row.adjustment,
            "scores": _named(names, floats(row.scores)),
            "cosines": _named(names, floats(row.cosines)),
            "meta": row.meta or {},
            "error": row.error,
            "held_path": row.held_path,
            "review_item_id": row.review_item_id,
            "review_status": row.review_status,
            "reviewer": row.reviewer,
            "review_reason": row.review_reason,
            "reviewed_at": iso(row.review_updated_at) if row.review_status in DECIDED else None,
            "labels": item_labels(row.review_status, row.review_labels, policy, row),
        }


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
    """Write `export_rows` to `out` as JSON lines or CSV (with a header); return the row count."""
    count = 0
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in export_rows(conn):
            writer.writerow({key: _cell(value) for key, value in row.items()})
            count += 1
    else:
        for row in export_rows(conn):
            out.write(json.dumps(row) + "\n")
            count += 1
    return count
