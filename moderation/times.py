"""Time, the one way: aware UTC datetimes, their ISO text, and the times people type
(--since/--until: an ISO date or datetime, or a span back from now such as 12h or 7d)."""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta, timezone

from moderation.text import escape_controls


def utcnow() -> datetime:
    """The current time as a timezone-aware UTC datetime."""
    return datetime.now(timezone.utc)


def utc(value: datetime) -> datetime:
    """A timezone-aware UTC datetime (naive values are taken as UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def iso(value: datetime | None) -> str | None:
    """ISO 8601 text of a UTC time, or None."""
    return None if value is None else utc(value).isoformat()


_AGO = re.compile(r"(\d+)\s*(m|min|h|d|w)", re.IGNORECASE)
_AGO_UNIT = {"m": "minutes", "min": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(
    value: str | date | datetime, *, what: str = "time", now: datetime | None = None
) -> datetime:
    """A point in time as aware UTC: an ISO date (its midnight UTC) or datetime (naive = UTC),
    or a span back from now such as 90m, 12h, 7d or 2w. ValueError names `what` (the option)."""
    if isinstance(value, datetime):
        return utc(value)
    if isinstance(value, date):
        return datetime.combine(value, time(0), tzinfo=timezone.utc)
    text = value.strip()
    ago = _AGO.fullmatch(text)
    if ago:
        span = timedelta(**{_AGO_UNIT[ago.group(2).lower()]: int(ago.group(1))})
        return utc(now or utcnow()) - span
    try:
        # Python 3.10 does not read a trailing "Z"; 3.11 does.
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise ValueError(
            f'invalid {what} "{escape_controls(value)}": expected an ISO date or datetime such '
            "as 2024-05-01 or 2024-05-01T12:00:00Z, or a span back from now such as 12h or 7d"
        ) from None
    return utc(parsed)


def parse_since(value: str | date | datetime) -> datetime:
    """`parse_time` for a --since value."""
    return parse_time(value, what="since")
