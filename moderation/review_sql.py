"""Dialect-specific SQL and time helpers of the review queue: fired-concept sets, UTC times."""

from __future__ import annotations

from datetime import date, datetime, time, timezone

from sqlalchemy import exists, func, literal, select
from sqlalchemy.sql.elements import ColumnElement

from moderation.storage.models import DecisionRow


def fired_concepts(dialect: str):
    """A table-valued `value` column over `decisions.fired`, one row per fired concept name."""
    if dialect == "postgresql":
        return func.jsonb_array_elements_text(DecisionRow.fired).table_valued("value")
    return func.json_each(DecisionRow.fired).table_valued("value")


def fired_contains(dialect: str, concept: str) -> ColumnElement[bool]:
    """True where `decisions.fired` names `concept` (bound as a parameter)."""
    names = fired_concepts(dialect)
    return exists(select(literal(1)).select_from(names).where(names.c.value == concept))


def utc(value: datetime) -> datetime:
    """A timezone-aware UTC datetime (naive values are taken as UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def parse_since(value: str | date | datetime) -> datetime:
    """An ISO date or datetime as aware UTC; a bare date means its midnight UTC."""
    if isinstance(value, datetime):
        return utc(value)
    if isinstance(value, date):
        return datetime.combine(value, time(0), tzinfo=timezone.utc)
    text = value.strip()
    try:
        # Python 3.10 does not read a trailing "Z"; 3.11 does.
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise ValueError(
            f'invalid since "{value}": expected an ISO date or datetime such as '
            "2024-05-01 or 2024-05-01T12:00:00Z"
        ) from None
    return utc(parsed)


def iso(value: datetime | None) -> str | None:
    """ISO 8601 text of a UTC time, or None."""
    return None if value is None else utc(value).isoformat()
