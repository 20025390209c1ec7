"""A reviewer's claim from the desk: renew its lease, or release it back to the queue. Both are
checked like a verdict (the owner, a live lease, the claim's token) and audited."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Connection, update

from moderation.desk.audit import record_event
from moderation.review.queries import iso, utc
from moderation.review.queue import ReviewQueue
from moderation.review.rows import locked_item
from moderation.review.rules import ReviewError, check_decidable
from moderation.storage.errors import database_errors
from moderation.storage.models import ReviewItem


def _own_live_claim(conn: Connection, queue: ReviewQueue, item_id: int, reviewer: str, token: str):
    row = locked_item(conn, item_id)
    if row.status != "claimed":
        raise ReviewError(f"item {item_id}: is {row.status}, not claimed by {reviewer}")
    check_decidable(row, reviewer, token or None, queue.now())
    return row


def renew(queue: ReviewQueue, item_id: int, reviewer: str, token: str) -> str:
    """Extend the reviewer's live lease by the queue's lease length; return the new expiry."""

    def work(conn: Connection) -> str:
        row = _own_live_claim(conn, queue, item_id, reviewer, token)
        now = queue.now()
        expires = now + timedelta(seconds=queue.lease_seconds)
        conn.execute(
            update(ReviewItem)
            .where(ReviewItem.id == item_id)
            .values(claim_expires_at=expires, updated_at=now)
        )
        details = {"previous_expiry": iso(utc(row.claim_expires_at)), "expires_at": iso(expires)}
        record_event(
            conn,
            reviewer,
            "lease_renewed",
            item_id=item_id,
            decision_id=row.decision_id,
            details=details,
            at=now,
        )
        return iso(expires) or ""

    with database_errors(queue.url):
        # The queue's own write transaction (SQLite: retried while other writers hold the lock).
        return queue._write(work)


def release_claim(queue: ReviewQueue, item_id: int, reviewer: str, token: str) -> None:
    """Give the item back to the queue (pending, nobody's) before the lease runs out."""

    def work(conn: Connection) -> None:
        row = _own_live_claim(conn, queue, item_id, reviewer, token)
        now = queue.now()
        conn.execute(
            update(ReviewItem)
            .where(ReviewItem.id == item_id)
            .values(
                status="pending",
                claim_owner=None,
                claim_token=None,
                claim_expires_at=None,
                updated_at=now,
            )
        )
        record_event(
            conn, reviewer, "claim_released", item_id=item_id, decision_id=row.decision_id, at=now
        )

    with database_errors(queue.url):
        queue._write(work)
