"""Streaming reads of the decision log for the lifecycle reports: chunks in time order.

Chunks come by keyset pagination on (created_at, id), oldest first: every query is an index
range scan of at most `chunk` rows, whatever the history's size, on SQLite and PostgreSQL alike,
and a decision logged while a report runs is read at most once. Only the columns a report asks
for are fetched; blobs stay bytes until the caller decodes a whole chunk with numpy.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select
from sqlalchemy.sql.elements import ColumnElement

from moderation.errors import ModerationError
from moderation.review.queries import newest_item
from moderation.storage.models import DecisionRow, PolicyRow, ReviewItem
from moderation.times import iso, parse_time

READ_CHUNK = 10_000  # knob: decisions per query (bounds memory: ~1.5 kB each at 768 floats)


class HistoryError(ModerationError):
    """The log cannot be read as asked (an unknown policy, a bad time)."""


@dataclass(frozen=True)
class Filters:
    """Which decisions a report reads: created in [since, until), of some policies, at most N."""

    since: datetime | None = None
    until: datetime | None = None
    policy: str | None = None  # a policy name or digest prefix, as `review list --policy`
    limit: int | None = None

    @classmethod
    def parse(
        cls,
        since: str | None = None,
        until: str | None = None,
        policy: str | None = None,
        limit: int | None = None,
    ) -> Filters:
        """Filters from option text; HistoryError (one line) for a bad time."""
        try:
            start = None if since is None else parse_time(since, what="since")
            end = None if until is None else parse_time(until, what="until")
        except ValueError as err:
            raise HistoryError(str(err)) from None
        return cls(start, end, policy or None, limit)

    def to_dict(self) -> dict[str, Any]:
        return {
            "since": iso(self.since),
            "until": iso(self.until),
            "policy": self.policy,
            "limit": self.limit,
        }

    def time_clauses(self, created: Any) -> list[ColumnElement[bool]]:
        """--since inclusive, --until exclusive, on the given created_at column."""
        clauses = []
        if self.since is not None:
            clauses.append(created >= self.since)
        if self.until is not None:
            clauses.append(created < self.until)
        return clauses


def unindexed(column: Any) -> Any:
    """`column` in an expression that no index matches (NULL as "").

    Chunks must be read along the created_at index (or (policy_digest, created_at)): were
    SQLite to pick ix_decisions_shadow_of for `shadow_of IS NULL` (every live row), or a policy
    index for `policy_digest IN (...)`, each chunk would sort every remaining row, and a
    backtest would take time quadratic in the history's size. Ids and digests are never "".
    """
    return func.coalesce(column, "")


def live_only() -> ColumnElement[bool]:
    """Live decisions only (shadow_of IS NULL), along the created_at index."""
    return unindexed(DecisionRow.shadow_of) == ""


def policy_matches(value: str) -> ColumnElement[bool]:
    """A policy's name is `value`, or its digest starts with it (`%` and `_` match themselves)."""
    return or_(PolicyRow.name == value, PolicyRow.digest.startswith(value, autoescape=True))


def logged_policies(conn: Connection, value: str | None = None) -> dict[str, Any]:
    """Every logged policy (digest -> row), or those `value` names; HistoryError when none does."""
    query = select(PolicyRow.__table__)
    if value is not None:
        query = query.where(policy_matches(value))
    rows = {row.digest: row for row in conn.execute(query)}
    if value is not None and not rows:
        raise HistoryError(f"no logged policy is named {value!r} or has a digest starting with it")
    return rows


def latest_review_status(decision_id: Any) -> Any:
    """The status of a decision's newest review item (NULL without one), as a scalar subquery."""
    return newest_item(decision_id, ReviewItem.status).scalar_subquery()


@contextlib.contextmanager
def scanning(conn: Connection) -> Iterator[Connection]:
    """`conn` set up for a long read along an index.

    PostgreSQL: no sequential scans in this read's transaction. Right after a bulk load, before
    autovacuum has analysed the table, the planner would otherwise read the whole table and
    sort it for every chunk (quadratic time). (SQLite's mmap would read embeddings about twice
    as fast, but every page it maps counts in the process's resident memory: 2 GB at 1,000,000
    decisions, so it stays off.)"""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
    yield conn


def count(conn: Connection, where: Sequence[ColumnElement[bool]], source: Any = None) -> int:
    """How many rows the chunks would hold (for a progress bar's total)."""
    query = select(func.count()).select_from(source if source is not None else DecisionRow)
    return int(conn.execute(query.where(*where)).scalar_one())


def chunks(
    conn: Connection,
    columns: Sequence[Any],
    where: Sequence[ColumnElement[bool]],
    *,
    created: Any = DecisionRow.created_at,
    key: Any = DecisionRow.id,
    source: Any = None,
    chunk: int = READ_CHUNK,
    limit: int | None = None,
) -> Iterator[list[Any]]:
    """Rows of `columns` (then `key`, the last of each row) matching `where`, oldest first,
    `chunk` at a time, at most `limit` in all.

    `created`/`key` are the (created_at, id) columns the pages are keyed on (an alias's for a
    join); `source` is what the query selects from when the columns alone do not say it. The
    created_at of a page's last row is read on its own: converting it for every row costs more
    than the one extra query per page.
    """
    if chunk < 1:
        raise ValueError("chunk must be positive")
    last: tuple[Any, Any] | None = None
    left = limit
    while left is None or left > 0:
        size = chunk if left is None else min(chunk, left)
        query = select(*columns, key)
        if source is not None:
            query = query.select_from(source)
        query = query.where(*where)
        if last is not None:
            # (created, key) > last, written so that both backends scan the created_at index.
            query = query.where(
                created >= last[0], or_(created > last[0], and_(created == last[0], key > last[1]))
            )
        rows = _fetch(conn, query.order_by(created, key).limit(size))
        if not rows:
            return
        yield rows
        if left is not None:
            left -= len(rows)
        if len(rows) < size:
            return
        table = key.table if source is None else source
        at = select(created).select_from(table).where(key == rows[-1][-1])
        last = (conn.execute(at).scalar_one(), rows[-1][-1])


def _fetch(conn: Connection, query: Any) -> list[Any]:
    """All rows of a query. On PostgreSQL through psycopg's binary protocol: bytea comes as
    its bytes, not as hex text twice their size to decode (the columns read here need no
    SQLAlchemy type processing: bytes, text, numbers)."""
    if conn.dialect.name != "postgresql" or conn.dialect.driver != "psycopg":
        return conn.execute(query).all()
    compiled = query.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    with conn.connection.driver_connection.cursor(binary=True) as cursor:
        cursor.execute(str(compiled), compiled.params)
        return cursor.fetchall()


def prefetched(chunks: Iterable[Any], depth: int = 1) -> Iterator[Any]:
    """The same chunks, read ahead by a thread: the database reads chunk i+1 while the caller
    works on chunk i (SQLite and psycopg release the GIL while they wait). At most `depth`
    chunks wait beside the one in use, so memory stays bounded; an error in the reader is
    raised here. The reader owns the connection until the iteration ends."""
    slots: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def read() -> None:
        try:
            for item in chunks:
                while not stop.is_set():
                    try:
                        slots.put(("chunk", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(("end", None))
        except BaseException as err:  # handed to the consumer, which raises it
            slots.put(("error", err))

    reader = threading.Thread(target=read, name="moderation-history-reader", daemon=True)
    reader.start()
    try:
        while True:
            kind, item = slots.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        while reader.is_alive():
            with contextlib.suppress(queue.Empty):
                slots.get(timeout=0.1)
        reader.join()
