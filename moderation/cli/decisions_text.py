"""Plain-text rendering of `moderation decisions list` and `show` for people.

Every value from the log is escaped (`clean`): table cells one by one, every other line as a
whole (`lines_of`), so that a prompt or user name cannot clear the screen or forge a line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from moderation.cli.review_text import event_line, indent, lines_of, num, table, when
from moderation.review.labels import render as render_labels


def concepts_cell(entry: dict[str, Any]) -> str:
    """`gore (+nudity, weapons)`: the top concept, then the other fired ones; for a decision
    where nothing fired, the nearest concept in brackets."""
    fired, top = list(entry["fired"]), entry["top_concept"]
    if not fired:
        return f"- (nearest {top})" if top else "-"
    first = top if top in fired else fired[0]
    others = [name for name in fired if name != first]
    return first + (f" (+{', '.join(others)})" if others else "")


def list_table(entries: Sequence[dict[str, Any]], *, shadow: bool = False) -> str:
    """The `decisions list` table (shadow decisions get the live decision's id column)."""
    headers = ["ID", "CREATED (UTC)", "VERDICT", "ACTION", "CONCEPTS", "POLICY", "USER"]
    if shadow:
        headers.append("SHADOW OF")
    rows = []
    for e in entries:
        user = e["user"]
        row = [
            e["decision_id"],
            when(e["created_at"]),
            e["verdict"],
            e["action"],
            concepts_cell(e),
            f"{e['policy_name']}@{e['policy_version']}",
            "-" if user is None else str(user),
        ]
        rows.append(row + ([e["shadow_of"]] if shadow else []))
    return table(headers, rows)


def _view(view: dict[str, Any] | None) -> str:
    if view is None:
        return ""
    where = f"{view['index']}"
    if view.get("frame") is not None:
        where += f" frame {view['frame']}"
    if view.get("box") is not None:
        where += " box " + ",".join(str(v) for v in view["box"])
    if view.get("range") is not None:
        where += f" read as [{view['range']}]"
    return where


def _won(won: dict[str, Any], shown: dict[str, Any]) -> str:
    by, error = won["set_by"], shown["decision"]["error"] or "unknown"
    if by == "concept":
        return (
            f"set by concept {won['concept']} (its action is {won['action']}; "
            f"score {num(won['score'])})"
        )
    if by == "special_care":
        hits = ", ".join(shown["special_care"]["hits"])
        return f"set by special care escalation ({hits})"
    if by == "review_band":
        near = ", ".join(shown["review_band"]["concepts"])
        return f"set by the review band ({near} within {shown['review_band']['band']:g})"
    if by == "error":
        return f"set by the policy's on_error (the image could not be scored: {error})"
    if by == "nothing_fired":
        return "nothing fired"
    return won["reason"]


def _views(views: list[dict[str, Any]] | None) -> list[str]:
    if views is None:
        return ["Views: one view (the whole image)"]
    lines = [f"Views: {len(views)} (each concept's cosine is the highest over them)"]
    for i, v in enumerate(views):
        box = ",".join(str(b) for b in v.get("box") or []) or "-"
        lines.append(f"  {i}: frame {v.get('frame', '-')}, box {box}")
    return lines


def _review(review: dict[str, Any] | None, labels: dict[str, Any] | None) -> list[str]:
    if review is None:
        return ["Review: none (this decision was never queued for review)"]
    lines = ["Review:"]
    for item in review["items"]:
        status = item["status"]
        if item["reviewer"]:
            status += f" by {item['reviewer']}" + (f": {item['reason']}" if item["reason"] else "")
        elif item["claim_owner"]:
            status += f" by {item['claim_owner']}"
        note = f"; reopened from item {item['reopened_from']}" if item["reopened_from"] else ""
        lines.append(f"  item {item['id']}: {status} (priority {item['priority']}{note})")
    lines.append(f"  labels: {render_labels(labels)}")
    rows = [event_line(e) for e in review["events"]]
    lines += ["  History (UTC):", *indent(table(["AT", "WHO", "EVENT", "NOTE"], rows), "    ")]
    return lines


def _shadow(shadow: dict[str, Any]) -> list[str]:
    if shadow["of"]:
        return [
            f"Shadow decision of live decision {shadow['of']} (a candidate policy's verdict; "
            "never acted on)"
        ]
    if not shadow["decisions"]:
        return []
    rows = [
        [
            s["decision_id"],
            f"{s['policy_name']}@{s['policy_version']}",
            s["policy_digest"][:12],
            s["verdict"],
            s["action"],
            ", ".join(s["fired"]) or "-",
        ]
        for s in shadow["decisions"]
    ]
    headers = ["SHADOW DECISION", "CANDIDATE", "DIGEST", "VERDICT", "ACTION", "FIRED"]
    return ["Shadow decisions (candidates, never acted on):", *indent(table(headers, rows))]


def render_decision(shown: dict[str, Any]) -> str:
    """The `decisions show` text."""
    dec, pol, care = shown["decision"], shown["policy"], shown["special_care"]
    meta = " ".join(f"{k}={json.dumps(v)}" for k, v in dec["meta"].items()) or "-"
    lines = [
        f"Decision {dec['id']} at {when(dec['created_at'])} UTC",
        f"  verdict {dec['verdict']}, action {dec['action']}: {_won(shown['winner'], shown)}",
        f"  policy {pol['name']} version {pol['version']} (digest {pol['digest']}, "
        f"compat {pol['compat'] or '-'}, model {pol['model_id']})",
        f"  metadata {meta}",
        f"  image sha256 {dec['image_sha256'] or '-'}",
        f"  held image {dec['held_file'] or '-'}",
    ]
    if dec["error"]:
        lines.append(f"  error {dec['error']}")
    rows = [
        [
            c["name"],
            c["action"] or "",
            num(c["cosine"], signed=False),
            num(c["threshold"], signed=False),
            num(c["margin_to_threshold"]),
            num(c["score"]),
            "yes" if c["fired"] else "",
            _view(c["view"]),
        ]
        for c in shown["concepts"]
    ]
    headers = ["CONCEPT", "ACTION", "COSINE", "THRESHOLD", "MARGIN", "SCORE", "FIRED", "VIEW"]
    listed, total = len(shown["concepts"]), shown["concepts_total"]
    title = (
        "Concepts (nearest first):"
        if listed == total
        else f"Concepts ({listed} nearest of {total}):"
    )
    lines += [title, *indent(table(headers, rows, right=(2, 3, 4, 5)))]
    hits = ", ".join(care["hits"]) or "none"
    lines.append(
        f"Special care: hits {hits}; adjustment applied {num(care['adjustment_applied'])} "
        f"(policy {num(care['adjustment'])}, escalate {care['escalate'] or '-'})"
    )
    if care["concepts"]:
        rows = [
            [
                s["name"],
                num(s["cosine"], False),
                num(s["threshold"], False),
                "yes" if s["hit"] else "",
                _view(s["view"]),
            ]
            for s in care["concepts"]
        ]
        headers = ["CONCEPT", "COSINE", "THRESHOLD", "HIT", "VIEW"]
        lines += indent(table(headers, rows, right=(1, 2)))
    band = shown["review_band"]
    if band["band"] > 0:
        within = ", ".join(band["concepts"]) or "none"
        lines.append(f"Review band {band['band']:g} below each threshold: concepts in it: {within}")
    else:
        lines.append("Review band: none (the policy has no review_band)")
    lines += _views(shown["views"])
    lines += _review(shown["review"], shown["labels"])
    lines += _shadow(shown["shadow"])
    return lines_of(lines)
