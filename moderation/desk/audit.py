"""The desk's audit: its own append-only events, and the one audit view an admin reads
(the desk's events merged with the review queue's `review_events`), filterable and exportable."""

from __future__ import annotations

import csv
import json
from datetime import datetime
from typing import IO, Any

from sqlalchemy import Connection, insert, select

from moderation.review.queries import iso
from moderation.storage.models import DeskEvent, ReviewEvent, utcnow
from moderation.text import spreadsheet_cell

AUDIT_FIELDS = ("source", "id", "at", "actor", "event", "item_id", "decision_id", "details")
EXPORT_FORMATS = ("csv", "jsonl")
MAX_AUDIT = 5000  # knob: most rows one audit page or export returns


def record_event(
    conn: Connection,
    actor: str,
    event: str,
    *,
    item_id: int | None = None,
    decision_id: str | None = None,
    details: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> None:
    """Append one desk event (in the caller's transaction)."""
    conn.execute(
        insert(DeskEvent).values(
            at=at or utcnow(),
            actor=actor,
            event=event,
            item_id=item_id,
            decision_id=decision_id,
            details=details or {},
        )
    )


def audit_events(
    conn: Connection,
    *,
    actor: str | None = None,
    event: str | None = None,
    item_id: int | None = None,
    since: datetime | None = None,
    limit: int = 200,
) -> list[dict[str, Any]]:
    """Newest first: desk events and review events matching every given filter."""
    limit = max(1, min(limit, MAX_AUDIT))
    rows: list[dict[str, Any]] = []
    for source, table in (("desk", DeskEvent), ("review", ReviewEvent)):
        query = select(
            table.id,
            table.at,
            table.actor,
            table.event,
            table.item_id,
            table.decision_id,
            table.details,
        )
        if actor:
            query = query.where(table.actor == actor)
        if event:
            query = query.where(table.event == event)
        if item_id is not None:
            query = query.where(table.item_id == item_id)
        if since is not None:
            query = query.where(table.at >= since)
        query = query.order_by(table.at.desc(), table.id.desc()).limit(limit)
        for r in conn.execute(query):
            details = dict(r.details or {})
            details.pop("token", None)  # a claim token is a credential of its owner
            rows.append(
                {
                    "source": source,
                    "id": r.id,
                    "at": iso(r.at),
                    "actor": r.actor,
                    "event": r.event,
                    "item_id": r.item_id,
                    "decision_id": r.decision_id,
                    "details": details,
                }
            )
    rows.sort(key=lambda e: (e["at"], e["source"], e["id"]), reverse=True)
    return rows[:limit]


def write_export(rows: list[dict[str, Any]], fmt: str, out: IO[str]) -> None:
    """The audit rows as CSV (spreadsheet-safe cells) or JSON lines."""
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row, sort_keys=True) + "\n")
        return
    writer = csv.writer(out)
    writer.writerow(AUDIT_FIELDS)
    for row in rows:
        cells = [
            row[f] if f != "details" else json.dumps(row[f], sort_keys=True) for f in AUDIT_FIELDS
        ]
        writer.writerow([spreadsheet_cell("" if c is None else str(c)) for c in cells])
