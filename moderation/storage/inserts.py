"""Batched inserts of policies, decisions, review items and their `created` events."""

from __future__ import annotations

import operator
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, Insert, Table, select
from sqlalchemy.dialects import postgresql, sqlite

from moderation.storage.errors import StorageError
from moderation.storage.models import DecisionRow, PolicyRow, ReviewEvent, ReviewItem
from moderation.storage.records import NULLABLE_JSON_COLUMNS, json_column

SYSTEM_ACTOR = "system"
_SQLITE_IDS_PER_QUERY = 10000  # well under SQLite's 32766 bound parameters

_DECISIONS: Table = DecisionRow.__table__  # type: ignore[assignment]
_POLICIES: Table = PolicyRow.__table__  # type: ignore[assignment]
_ITEMS: Table = ReviewItem.__table__  # type: ignore[assignment]
_EVENTS: Table = ReviewEvent.__table__  # type: ignore[assignment]

_COLUMNS = [c.name for c in _DECISIONS.columns]
_values_of = operator.itemgetter(*_COLUMNS)
_TIME_AT = _COLUMNS.index("created_at")
_JSON_AT = [_COLUMNS.index(n) for n in ("fired", "special_hits", "meta", *NULLABLE_JSON_COLUMNS)]
_EMPTY_JSON = {list: "[]", dict: "{}"}
_PG_ARRAY_TYPES = {
    "String": "text[]",
    "Text": "text[]",
    "UTCDateTime": "timestamptz[]",
    "Float": "float8[]",
    "LargeBinary": "bytea[]",
    "JSON": "jsonb[]",
}
_PG_INSERT = (
    f"INSERT INTO decisions ({', '.join(_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"%b::{_PG_ARRAY_TYPES[type(c.type).__name__]}" for c in _DECISIONS.columns)
    + ") ON CONFLICT (id) DO NOTHING RETURNING id"
)
_SQLITE_INSERT = (
    f"INSERT INTO decisions ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_COLUMNS))}) ON CONFLICT (id) DO NOTHING"
)


def dialect_insert(conn: Connection, table: Table) -> Insert:
    """INSERT of the connection's dialect (for ON CONFLICT)."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    raise StorageError(f"unsupported database {conn.dialect.name!r} (use SQLite or PostgreSQL)")


def insert_policies(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert policies, keeping the first row stored per digest."""
    stmt = dialect_insert(conn, _POLICIES).on_conflict_do_nothing(index_elements=["digest"])
    conn.execute(stmt, rows)


def insert_decisions(conn: Connection, rows: list[dict], reviews: list[dict | None]) -> int:
    """Insert new decisions, then review items + `created` events for them; returns count."""
    added = _insert_new_decisions(conn, rows)
    items: list[dict] = []
    queued: set[str] = set()
    for row, review in zip(rows, reviews, strict=True):
        if review is None or row["id"] not in added or row["id"] in queued:
            continue
        queued.add(row["id"])  # a batch that repeats an id queues it once
        items.append(
            {
                "decision_id": row["id"],
                "status": "pending",
                "priority": review["priority"],
                "margin": review["margin"],
                "created_at": row["created_at"],
                "updated_at": row["created_at"],
            }
        )
    if items:
        returned = conn.execute(
            dialect_insert(conn, _ITEMS).returning(_ITEMS.c.id, _ITEMS.c.decision_id), items
        ).all()
        item_of = {decision_id: item_id for item_id, decision_id in returned}
        events = [
            {
                "item_id": item_of[item["decision_id"]],
                "decision_id": item["decision_id"],
                "at": item["created_at"],
                "actor": SYSTEM_ACTOR,
                "event": "created",
                "reason": None,
                "details": {"priority": item["priority"], "margin": item["margin"]},
            }
            for item in items
        ]
        conn.execute(dialect_insert(conn, _EVENTS), events)
    return len(added)


def _insert_new_decisions(conn: Connection, rows: list[dict]) -> set[str]:
    """Insert the rows whose id is not stored yet (first of repeats); returns the ids added."""
    if conn.dialect.name == "postgresql":
        # One statement over column arrays: no per-row SQL to build or parse, one round trip,
        # and RETURNING tells which ids are new even with concurrent writers.
        columns = [list(col) for col in zip(*map(_values_of, rows), strict=True)]
        for at in _JSON_AT:
            columns[at] = [json_column(row, _COLUMNS[at]) for row in rows]
        return set(conn.exec_driver_sql(_PG_INSERT, tuple(columns)).scalars())
    if conn.dialect.name != "sqlite":
        stmt = dialect_insert(conn, _DECISIONS).on_conflict_do_nothing(index_elements=["id"])
        return set(conn.execute(stmt.returning(_DECISIONS.c.id), rows).scalars())
    # SQLite: we hold the write lock (BEGIN IMMEDIATE), so looking up the ids already stored
    # cannot race; one prepared statement via the driver's executemany is then ~2x faster than
    # SQLAlchemy's per-value bind processing or INSERT ... RETURNING over a 1000-row VALUES.
    ids = [row["id"] for row in rows]
    stored: set[str] = set()
    for start in range(0, len(ids), _SQLITE_IDS_PER_QUERY):
        chunk = ids[start : start + _SQLITE_IDS_PER_QUERY]
        query = select(_DECISIONS.c.id).where(_DECISIONS.c.id.in_(chunk))
        stored.update(conn.execute(query).scalars())
    new: dict[str, dict] = {}
    for row in rows:
        if row["id"] not in stored:
            new.setdefault(row["id"], row)
    if new:
        conn.exec_driver_sql(_SQLITE_INSERT, [_sqlite_values(row) for row in new.values()])
    return set(new)


def _sqlite_values(row: dict) -> tuple:
    """DB-ready values, exactly as SQLAlchemy's SQLite types would bind them."""
    values = list(_values_of(row))
    values[_TIME_AT] = sqlite_time(values[_TIME_AT])
    for at in _JSON_AT:
        value = values[at]
        if value is None or value:
            values[at] = json_column(row, _COLUMNS[at])
        else:
            values[at] = _EMPTY_JSON[type(value)]
    return tuple(values)


def sqlite_time(value: datetime) -> str:
    """SQLAlchemy's SQLite DATETIME text of a UTC instant (`YYYY-MM-DD HH:MM:SS.ffffff`)."""
    if value.tzinfo is not None:
        if value.tzinfo is not timezone.utc:  # astimezone is the slow part; rows are UTC already
            value = value.astimezone(timezone.utc)
        value = value.replace(tzinfo=None)
    return value.isoformat(" ", "microseconds")
