"""Review queue: leased claims on held decisions, human verdicts and an append-only audit trail.

Rules (see `ReviewQueue`):
- `claim` leases the next items in queue order (`priority DESC, margin DESC, created_at ASC,
  id ASC`) that are `pending` or `claimed` with an expired lease; each claim gets a fresh token.
- `approve`/`reject` of a claimed item need its owner, a live lease and, when given, the token of
  the current claim. A `pending` item that nobody holds may be decided directly by a named
  reviewer without a token (the event says `"direct": true`); the row lock makes that atomic
  against concurrent claims. Expired leases and decided items are refused.
- `reopen` (an appeal) of an approved/rejected item adds a new linked `pending` item; the old
  item keeps its status. An item is reopened at most once: appeal the newest item of a chain.
- Every change appends `review_events` rows in the same transaction; events are never changed.
- A verdict records labels (the concepts the image really shows) with it: review/labels.py.
"""

from __future__ import annotations

import functools
import random
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import IO, Any, TypeVar

from sqlalchemy import Connection, Engine, exc, insert, or_, select, update

from moderation.review.explain import explain_item
from moderation.review.labels import verdict_labels
from moderation.review.outbox import enqueue_verdict
from moderation.review.queries import (
    VIEW_COLUMNS,
    Claim,
    ReviewItemView,
    claimable_at,
    fired_contains,
    item_view,
    newest_item,
    status_is,
)
from moderation.review.report import EXPORT_FORMATS, export_decisions, queue_stats
from moderation.review.rows import event_row, locked_item
from moderation.review.rules import (
    ReviewError,
    check_decidable,
    check_item_id,
    check_release,
    required_reason,
    reviewer_name,
)
from moderation.storage.db import immediate_transaction, resolve_db_url
from moderation.storage.errors import database_errors, display_url
from moderation.storage.held import HeldStore
from moderation.storage.models import (
    DecisionRow,
    PolicyRow,
    ReviewEvent,
    ReviewItem,
)
from moderation.storage.schema import get_engine
from moderation.times import iso, parse_since, parse_time, utc, utcnow
from policy.vocabulary import DECIDED, REVIEW_STATUSES

__all__ = ["ReviewQueue"]

QUEUE_ORDER = (
    ReviewItem.priority.desc(),
    ReviewItem.margin.desc(),
    ReviewItem.created_at.asc(),
    ReviewItem.id.asc(),
)
MAX_CLAIM = 1000  # one claim transaction holds its rows locked; keep batches small
MAX_LIST = 10_000
# Knob: how long a SQLite claim/verdict keeps retrying while other processes hold the write
# lock (each try already waits the engine's busy timeout); PostgreSQL never needs this.
SQLITE_LOCK_WAIT_S = 60.0
T = TypeVar("T")


def _database_errors(method: Callable) -> Callable:
    """Run a queue method under the storage boundary's one SQLAlchemy-error wrapper."""

    @functools.wraps(method)
    def wrapper(self: ReviewQueue, *args: Any, **kwargs: Any) -> Any:
        with database_errors(self.url):
            return method(self, *args, **kwargs)

    return wrapper


def _sqlite_busy(err: exc.OperationalError) -> bool:
    code = getattr(err.orig, "sqlite_errorcode", None)
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "database is locked" in str(
        err.orig
    )


class ReviewQueue:
    """The shared review queue over the decision log (SQLite or PostgreSQL)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        lease_seconds: int = 900,
        engine: Engine | None = None,
        now: Callable[[], datetime] | None = None,
    ):
        if not isinstance(lease_seconds, int) or lease_seconds < 1:
            raise ReviewError(
                f"lease must be a whole number of seconds >= 1, got {lease_seconds!r}"
            )
        self.lease_seconds = lease_seconds
        # An injectable clock: tests move time instead of sleeping through leases.
        self._now = now or utcnow
        self.url = str(engine.url) if engine is not None else resolve_db_url(url)
        # get_engine caches one engine per URL; it opens an existing database at head only (a
        # mistyped SQLite path or a never-migrated database is an error, never created here).
        with database_errors(self.url):
            self.engine = engine if engine is not None else get_engine(self.url)

    def now(self) -> datetime:
        """The queue's clock, aware UTC."""
        return utc(self._now())

    def _write(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in one write transaction; on SQLite, retry while other writers hold the lock."""
        deadline = time.monotonic() + SQLITE_LOCK_WAIT_S
        while True:
            try:
                with immediate_transaction(self.engine) as conn:
                    return work(conn)
            except exc.OperationalError as err:
                if not _sqlite_busy(err):
                    raise
                if time.monotonic() >= deadline:
                    raise ReviewError(
                        f"the database stayed locked by other writers for {SQLITE_LOCK_WAIT_S:.0f} s;"
                        " try again"
                    ) from err
                # The transaction was rolled back (busy at BEGIN IMMEDIATE): a retry is safe.
                time.sleep(random.uniform(0.005, 0.05))

    # -- changes -------------------------------------------------------------------------------

    @_database_errors
    def claim(self, reviewer: str, n: int = 1, *, special_care: bool = True) -> list[Claim]:
        """Lease the next `n` claimable items to `reviewer`; fewer (or none) when the queue runs
        dry. special_care=False leaves out items that special care escalated (priority 1)."""
        reviewer = reviewer_name(reviewer)
        if not isinstance(n, int) or not 1 <= n <= MAX_CLAIM:
            raise ReviewError(f"can claim 1 to {MAX_CLAIM} items at a time, not {n!r}")
        return self._write(lambda conn: self._claim(conn, reviewer, n, special_care))

    def _claim(self, conn: Connection, reviewer: str, n: int, special_care: bool) -> list[Claim]:
        now = self.now()
        expires = now + timedelta(seconds=self.lease_seconds)
        claimable = claimable_at(now, special_care)
        query = (
            select(
                ReviewItem.id,
                ReviewItem.decision_id,
                ReviewItem.status,
                ReviewItem.claim_owner,
                ReviewItem.claim_expires_at,
            )
            .where(claimable)
            .order_by(*QUEUE_ORDER)
            .limit(n)
            # PostgreSQL: concurrent claimers skip each other's rows; SQLite ignores this and
            # relies on the BEGIN IMMEDIATE write lock of `immediate_transaction`.
            .with_for_update(skip_locked=True)
        )
        claims: list[Claim] = []
        events: list[dict[str, Any]] = []
        for row in conn.execute(query).all():
            token = str(uuid.uuid4())
            if row.status == "claimed":
                details = {
                    "previous_owner": row.claim_owner,
                    "expired_at": iso(row.claim_expires_at),
                }
                events.append(event_row(row, now, reviewer, "lease_expired", None, details))
            conn.execute(
                update(ReviewItem)
                .where(ReviewItem.id == row.id)
                .values(
                    status="claimed",
                    claim_owner=reviewer,
                    claim_token=token,
                    claim_expires_at=expires,
                    updated_at=now,
                )
            )
            details = {
                "token": token,
                "expires_at": iso(expires),
                "lease_seconds": self.lease_seconds,
            }
            events.append(event_row(row, now, reviewer, "claimed", None, details))
            claims.append(Claim(row.id, row.decision_id, token, expires))
        if events:
            conn.execute(insert(ReviewEvent), events)
        return claims

    @_database_errors
    def approve(
        self,
        item_id: int,
        reviewer: str,
        token: str | None = None,
        reason: str | None = None,
        concepts: Sequence[str] | None = None,
    ) -> None:
        """Approve an item (release the image): claimed by `reviewer`, or pending and unheld.

        concepts: what the image shows although it is acceptable (default: the special-care
        hits; the fired concepts were false alarms); see moderation.review.labels.
        """
        reason = (reason or "").strip() or None
        self._decide(item_id, reviewer, "approved", token, reason, concepts)

    @_database_errors
    def reject(
        self,
        item_id: int,
        reviewer: str,
        reason: str,
        token: str | None = None,
        concepts: Sequence[str] | None = None,
    ) -> None:
        """Reject an item (keep it moderated); a reason is required.

        concepts: the policy's concepts the image really shows (default: those that fired).
        """
        reason = required_reason(reason, "reject")
        self._decide(item_id, reviewer, "rejected", token, reason, concepts)

    @_database_errors
    def reopen(self, item_id: int, reviewer: str, reason: str) -> int:
        """Appeal a decided item: add a new linked pending item and return its id."""
        reviewer = reviewer_name(reviewer)
        reason = required_reason(reason, "reopen")
        return self._write(lambda conn: self._reopen(conn, item_id, reviewer, reason))

    def _reopen(self, conn: Connection, item_id: int, reviewer: str, reason: str) -> int:
        now = self.now()
        row = locked_item(conn, item_id)
        if row.status not in DECIDED:
            raise ReviewError(
                f"item {item_id}: is {row.status}; only approved or rejected items can be reopened"
            )
        child = conn.execute(
            select(ReviewItem.id, ReviewItem.status)
            .where(ReviewItem.reopened_from == item_id)
            .order_by(ReviewItem.id.desc())
            .limit(1)
        ).first()
        if child is not None:
            raise ReviewError(
                f"item {item_id}: already reopened as item {child.id} ({child.status}); "
                f"reopen item {child.id} instead"
            )
        new_id = conn.execute(
            insert(ReviewItem)
            .values(
                decision_id=row.decision_id,
                status="pending",
                priority=row.priority,
                margin=row.margin,
                created_at=now,
                updated_at=now,
                reopened_from=item_id,
            )
            .returning(ReviewItem.id)
        ).scalar_one()
        events = [
            event_row(row, now, reviewer, "reopened", reason, {"new_item": new_id}),
            {
                **event_row(row, now, reviewer, "created", reason, {"reopened_from": item_id}),
                "item_id": new_id,
            },
        ]
        conn.execute(insert(ReviewEvent), events)
        return int(new_id)

    def _decide(self, item_id: int, reviewer: str, status: str, *verdict: Any) -> None:
        reviewer = reviewer_name(reviewer)
        self._write(lambda conn: self._verdict(conn, item_id, reviewer, status, *verdict))

    def _verdict(
        self,
        conn: Connection,
        item_id: int,
        reviewer: str,
        status: str,
        token: str | None,
        reason: str | None,
        concepts: Sequence[str] | None,
    ) -> None:
        now = self.now()
        row = locked_item(conn, item_id)
        direct = check_decidable(row, reviewer, token, now)
        labels = verdict_labels(conn, row, status, concepts)
        conn.execute(
            update(ReviewItem)
            .where(ReviewItem.id == item_id)
            .values(
                status=status,
                reviewer=reviewer,
                reason=reason,
                claim_owner=None,
                claim_token=None,
                claim_expires_at=None,
                updated_at=now,
                labels=labels,
            )
        )
        details = {"direct": direct, "token": row.claim_token, "labels": labels}
        conn.execute(insert(ReviewEvent), [event_row(row, now, reviewer, status, reason, details)])
        # Same transaction: a verdict and its webhook deliveries are recorded together or not at all.
        enqueue_verdict(conn, row, status, labels, now)

    # -- reads ---------------------------------------------------------------------------------

    @_database_errors
    def list(
        self,
        *,
        status: str | None = None,
        policy: str | None = None,
        concept: str | None = None,
        since: str | datetime | None = None,
        until: str | datetime | None = None,
        limit: int = 50,
    ) -> list[ReviewItemView]:
        """Items in queue order, filtered; every filter value is bound as a parameter. `since`
        and `until` (exclusive): ISO dates or datetimes, or spans back from now such as 7d. An
        item whose lease expired is listed as `pending`, as claim hands it out again."""
        if not isinstance(limit, int) or not 1 <= limit <= MAX_LIST:
            raise ReviewError(f"limit must be 1 to {MAX_LIST}, not {limit!r}")
        now = self.now()
        query = (
            select(*VIEW_COLUMNS)
            .join(DecisionRow, ReviewItem.decision_id == DecisionRow.id)
            .join(PolicyRow, DecisionRow.policy_digest == PolicyRow.digest)
        )
        if status is not None:
            if status not in REVIEW_STATUSES:
                raise ReviewError(
                    f'unknown status "{status}"; choose from {", ".join(REVIEW_STATUSES)}'
                )
            query = query.where(status_is(status, now))
        if policy is not None:
            if not policy.strip():
                raise ReviewError("policy filter is empty: give a policy name or digest prefix")
            # autoescape: "%" and "_" in the value match themselves, not any characters.
            query = query.where(
                or_(PolicyRow.name == policy, PolicyRow.digest.startswith(policy, autoescape=True))
            )
        if concept is not None:
            if not concept.strip():
                raise ReviewError("concept filter is empty: give a concept name")
            query = query.where(fired_contains(self.engine.dialect.name, concept))
        if since is not None:
            try:
                start = parse_since(since)
            except ValueError as err:
                raise ReviewError(str(err)) from None
            query = query.where(ReviewItem.created_at >= start)
        if until is not None:
            try:
                end = parse_time(until, what="until")
            except ValueError as err:
                raise ReviewError(str(err)) from None
            query = query.where(ReviewItem.created_at < end)
        query = query.order_by(*QUEUE_ORDER).limit(limit)
        with self.engine.connect() as conn:
            return [item_view(row, now) for row in conn.execute(query)]

    @_database_errors
    def show(self, item_id: int) -> dict[str, Any]:
        """The full explanation of one item: decision, per-concept scores, policy, history."""
        check_item_id(item_id)
        with self.engine.connect() as conn:
            shown = explain_item(conn, item_id, self.now())
        if shown is None:
            raise ReviewError(f"item {item_id}: no such review item")
        return shown

    @_database_errors
    def stats(self) -> dict[str, Any]:
        """Queue depth per status, oldest pending age, decisions per fired concept and action."""
        with self.engine.connect() as conn:
            return queue_stats(conn, self.now())

    @_database_errors
    def release(self, decision_id: str, held: HeldStore) -> bytes:
        """The held original (PNG bytes) of a decision, once its latest review item is approved."""
        with self.engine.connect() as conn:
            decision = conn.execute(
                select(DecisionRow.held_path).where(DecisionRow.id == decision_id)
            ).first()
            columns = (ReviewItem.id, ReviewItem.status, ReviewItem.reviewer, ReviewItem.reason)
            item = conn.execute(newest_item(decision_id, *columns)).first()
        if decision is None:
            raise ReviewError(f"no decision {decision_id} in {display_url(self.url)}")
        check_release(decision_id, decision.held_path, item)
        return held.get(decision.held_path)

    @_database_errors
    def export(self, fmt: str, out: IO[str]) -> int:
        """Write every live decision with its latest review status and labels as `jsonl` or
        `csv`; return rows."""
        if fmt not in EXPORT_FORMATS:
            raise ReviewError(
                f'unknown export format "{fmt}"; choose from {", ".join(EXPORT_FORMATS)}'
            )
        with self.engine.connect() as conn:
            return export_decisions(conn, fmt, out)
