"""Plain-text rendering of review items, explanations and stats for people (tables, UTC times).

Every value from the database is escaped with `clean` (names, reasons, concepts, prompts, files):
table cells one by one, and every other line as a whole, so that one line stays one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from moderation.cli.options import clean
from moderation.tables import fixed, format_table
from moderation.times import utc


def when(value: str | datetime | None) -> str:
    """`2024-05-01 12:00:04` (UTC) from an ISO string or datetime; empty for None."""
    if value is None:
        return ""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return utc(value).strftime("%Y-%m-%d %H:%M:%S")


def num(value: float | None, signed: bool = True) -> str:
    """A score with three decimals (`+0.146`), or `-` when missing."""
    return fixed(value, signed=signed)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; column indexes in `right` are right-aligned."""
    return format_table(headers, rows, right=right, rule=False)


def indent(text: str, prefix: str = "  ") -> list[str]:
    """The lines of a rendered block (already escaped), indented."""
    return [prefix + line for line in text.split("\n")]


def lines_of(lines: list[str]) -> str:
    """Lines that may hold values from users, each escaped into exactly one line."""
    return "\n".join(clean(line) for line in lines)


def age(seconds: float) -> str:
    """`3d 4h`, `2h 5m`, `1m 1s` or `12s`: the two largest units."""
    seconds = int(seconds)
    parts = [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)]
    out: list[str] = []
    for unit, size in parts:
        if seconds >= size or (unit == "s" and not out):
            out.append(f"{seconds // size}{unit}")
            seconds %= size
    return " ".join(out[:2])


def items_table(items: Sequence[dict[str, Any]]) -> str:
    """The `review list` table from `ReviewItemView.to_dict()` rows."""
    rows = []
    for i in items:
        who = i["reviewer"] or ""
        if i["status"] == "claimed":
            who = f"{i['claim_owner']} until {when(i['claim_expires_at'])}"
        rows.append(
            [
                str(i["id"]),
                i["status"],
                str(i["priority"]),
                num(i["margin"]),
                i["action"],
                ", ".join(i["fired"]) or "-",
                f"{i['policy_name']}@{i['policy_version']}",
                when(i["created_at"]),
                who,
            ]
        )
    headers = ["ID", "STATUS", "PRI", "MARGIN", "ACTION", "FIRED", "POLICY", "CREATED (UTC)", "WHO"]
    return table(headers, rows, right=(0, 2, 3))


def event_line(e: dict[str, Any]) -> list[str]:
    d = e["details"]
    note = e["reason"] or ""
    if e["event"] == "claimed":
        note = f"lease until {when(d.get('expires_at'))}"
    elif e["event"] == "lease_expired":
        note = f"{d.get('previous_owner')}'s lease ended {when(d.get('expired_at'))}"
    elif e["event"] == "reopened":
        note = f"as item {d.get('new_item')}: {e['reason']}"
    elif e["event"] == "created" and d.get("reopened_from"):
        note = f"reopened from item {d['reopened_from']}: {e['reason']}"
    elif d.get("direct"):
        note = f"{note} (without a claim)".strip()
    return [when(e["at"]), e["actor"], e["event"], note]


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def render_stats(stats: dict[str, Any]) -> str:
    """The `review stats` text."""
    queue = stats["queue"]
    expired = stats["expired_leases"]
    lines = [
        "Queue: "
        + _counts(queue)
        + (f" ({expired} claimed with an expired lease)" if expired else "")
    ]
    oldest = stats["oldest_pending"]
    if oldest:
        lines.append(
            f"Oldest pending: item {oldest['item_id']}, created {when(oldest['created_at'])} UTC "
            f"({age(oldest['age_seconds'])} ago)"
        )
    decisions = stats["decisions"]
    lines += [
        f"Decisions: {decisions['total']}",
        f"  by action: {_counts(decisions['by_action'])}",
        f"  by verdict: {_counts(decisions['by_verdict'])}",
        f"  by fired concept: {_counts(decisions['by_concept'])}",
    ]
    return lines_of(lines)
