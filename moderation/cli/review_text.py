"""Plain-text rendering of review items, explanations and stats for people (tables, UTC times).

Every value from the database is escaped with `clean` (names, reasons, concepts, prompts, files):
table cells one by one, and every other line as a whole, so that one line stays one line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from moderation.cli.options import clean
from moderation.review.labels import render as render_labels
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


def render_show(shown: dict[str, Any]) -> str:
    """The `review show` text: item, decision, per-concept scores, special care, history."""
    item, dec, pol = shown["item"], shown["decision"], shown["policy"]
    status = item["status"]
    if status == "claimed":
        status += f" by {item['claim_owner']} until {when(item['claim_expires_at'])} UTC"
    elif item["reviewer"]:
        status += f" by {item['reviewer']}" + (f": {item['reason']}" if item["reason"] else "")
    links = []
    if item["reopened_from"]:
        links.append(f"reopened from item {item['reopened_from']}")
    if item["reopened_as"]:
        links.append("reopened as item " + ", ".join(map(str, item["reopened_as"])))
    meta = " ".join(f"{k}={json.dumps(v)}" for k, v in dec["meta"].items()) or "-"
    lines = [
        f"Item {item['id']}: {status}",
        f"  priority {item['priority']}, margin {num(item['margin'])}, created {when(item['created_at'])} UTC"
        + (f"; {'; '.join(links)}" if links else ""),
        f"Decision {dec['id']} at {when(dec['created_at'])} UTC",
        f"  verdict {dec['verdict']}, action {dec['action']}, top concept {dec['top_concept'] or '-'}",
        f"  image sha256 {dec['image_sha256'] or '-'}",
        f"  held image {dec['held_file'] or '-'}",
        f"  meta {meta}",
    ]
    if item.get("labels") is not None:
        lines.insert(2, f"  labels: {clean(render_labels(item['labels']))}")
    if dec["error"]:
        lines.append(f"  error {dec['error']}")
    lines.append(
        f"Policy {pol['name']} version {pol['version']} (digest {pol['digest'][:12]}, model {pol['model_id']})"
    )
    rows = [
        [
            c["name"],
            c["severity"] or "",
            c["action"] or "",
            num(c["cosine"], signed=False),
            num(c["threshold"], signed=False),
            num(c["margin_to_threshold"]),
            num(c["score"]),
            "yes" if c["fired"] else "",
        ]
        for c in shown["concepts"]
    ]
    headers = ["CONCEPT", "SEVERITY", "ACTION", "COSINE", "THRESHOLD", "MARGIN", "SCORE", "FIRED"]
    lines += ["Concepts:", *indent(table(headers, rows, right=(3, 4, 5, 6)))]
    care = shown["special_care"]
    lines.append(
        f"Special care: adjustment applied {num(care['adjustment_applied'])} "
        f"(policy {num(care['adjustment'])}, escalate {care['escalate'] or '-'})"
    )
    if care["concepts"]:
        rows = [
            [
                s["name"],
                num(s["cosine"], False),
                num(s["threshold"], False),
                "yes" if s["hit"] else "",
            ]
            for s in care["concepts"]
        ]
        lines += indent(table(["CONCEPT", "COSINE", "THRESHOLD", "HIT"], rows, right=(1, 2)))
    rows = [event_line(e) for e in shown["events"]]
    lines += ["History (UTC):", *indent(table(["AT", "WHO", "EVENT", "NOTE"], rows))]
    return lines_of(lines)


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
