"""Plain-text rendering of `moderation decisions list` and `show` for people.

Every value from the log is escaped (`clean`): table cells one by one, every other line as a
whole (`lines_of`), so that a prompt or user name cannot clear the screen or forge a line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from moderation.cli.options import clean
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
        user = e["metadata"].get("user")
        row = [
            e["decision_id"],
            when(e["created_at"]),
            e["verdict"],
            e["action"],
            concepts_cell(e),
            f"{e['policy']['name']}@{e['policy']['version']}",
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


def reason_line(doc: dict[str, Any]) -> str:
    """What set the action, for people (the document's `action_reason`)."""
    why = doc["action_reason"]
    rule, concept = why["rule"], why["concept"]
    if rule == "concept":
        score = next((c["score"] for c in doc["concepts"] if c["name"] == concept), None)
        score_text = f"; score {num(score)}" if score is not None else ""
        return f"set by concept {concept} (its action is {doc['action']}{score_text})"
    if rule == "special_care":
        hits = ", ".join(doc["special_care"]["hits"])
        return f"set by special care escalation ({hits})"
    if rule == "review_band":
        near = ", ".join(doc["review_band"]["concepts"])
        return f"set by the review band ({near} within {doc['review_band']['band']:g})"
    if rule == "error":
        return f"set by the policy's on_error (the image could not be scored: {doc['error'] or 'unknown'})"
    if rule == "nothing_fired":
        return "nothing fired"
    return why["text"]


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


def _shadow(doc: dict[str, Any]) -> list[str]:
    if doc["shadow_of"]:
        return [
            f"Shadow decision of live decision {doc['shadow_of']} (a candidate policy's verdict; "
            "never acted on)"
        ]
    if not doc["shadows"]:
        return []
    rows = [
        [
            s["decision_id"],
            f"{s['policy']['name']}@{s['policy']['version']}",
            s["policy"]["digest"][:12],
            s["verdict"],
            s["action"],
            ", ".join(s["fired"]) or "-",
        ]
        for s in doc["shadows"]
    ]
    headers = ["SHADOW DECISION", "CANDIDATE", "DIGEST", "VERDICT", "ACTION", "FIRED"]
    return ["Shadow decisions (candidates, never acted on):", *indent(table(headers, rows))]


def concept_lines(doc: dict[str, Any]) -> list[str]:
    """The concept table (nearest first), special care and the review band of a document."""
    rows = [
        [
            c["name"],
            c["action"] or "",
            num(c["cosine"], signed=False),
            num(c["threshold"], signed=False),
            num(c["margin"]),
            num(c["score"]),
            "yes" if c["fired"] else "",
            _view(c["view"]),
        ]
        for c in doc["concepts"]
    ]
    headers = ["CONCEPT", "ACTION", "COSINE", "THRESHOLD", "MARGIN", "SCORE", "FIRED", "VIEW"]
    listed, total = doc["concepts_listed"], doc["concepts_total"]
    title = (
        "Concepts (nearest first):"
        if listed == total
        else f"Concepts ({listed} nearest of {total}):"
    )
    lines = [title, *indent(table(headers, rows, right=(2, 3, 4, 5)))]
    care, pol = doc["special_care"], doc["policy"]
    hits = ", ".join(care["hits"]) or "none"
    lines.append(
        f"Special care: hits {hits}; adjustment applied {num(care['adjustment'])} "
        f"(policy {num(pol['adjustment'])}, escalate {pol['escalate'] or '-'})"
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
    band = doc["review_band"]
    if band["band"] > 0:
        within = ", ".join(band["concepts"]) or "none"
        lines.append(f"Review band {band['band']:g} below each threshold: concepts in it: {within}")
    else:
        lines.append("Review band: none (the policy has no review_band)")
    return lines


def decision_lines(doc: dict[str, Any]) -> list[str]:
    """The head of a decision's explanation: verdict and reason, policy, metadata, image."""
    pol = doc["policy"]
    meta = " ".join(f"{k}={json.dumps(v)}" for k, v in doc["metadata"].items()) or "-"
    lines = [
        f"Decision {doc['decision_id']} at {when(doc['created_at'])} UTC",
        f"  verdict {doc['verdict']}, action {doc['action']}: {reason_line(doc)}",
        f"  policy {pol['name']} version {pol['version']} (digest {pol['digest']}, "
        f"compat {pol['compat'] or '-'}, model {pol['model']})",
        f"  metadata {meta}",
        f"  image sha256 {doc['image_sha256'] or '-'}",
        f"  held image {doc['held_file'] or '-'}",
    ]
    if doc["error"]:
        lines.append(f"  error {doc['error']}")
    return lines


def render_decision(shown: dict[str, Any]) -> str:
    """The `decisions show` text."""
    lines = decision_lines(shown) + concept_lines(shown)
    lines += _views(shown["views"])
    lines += _review(shown["review"], shown["labels"])
    lines += _shadow(shown)
    return lines_of(lines)


def render_show(shown: dict[str, Any]) -> str:
    """The `review show` text: the item, then the decision explained as `decisions show`
    explains it (reason, concepts nearest first, special care, review band), then the item's
    history."""
    item = shown["item"]
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
    lines = [
        f"Item {item['id']}: {status}",
        f"  priority {item['priority']}, margin {num(item['margin'])}, created {when(item['created_at'])} UTC"
        + (f"; {'; '.join(links)}" if links else ""),
    ]
    if item.get("labels") is not None:
        lines.append(f"  labels: {clean(render_labels(item['labels']))}")
    lines.append(f"  why it is in review: {review_reason(shown)}")
    lines += decision_lines(shown)
    lines += concept_lines(shown)
    rows = [event_line(e) for e in shown["events"]]
    lines += ["History (UTC):", *indent(table(["AT", "WHO", "EVENT", "NOTE"], rows))]
    return lines_of(lines)


def review_reason(doc: dict[str, Any]) -> str:
    """Why a decision went to review: the review band, a special-care escalation, or its action."""
    why, hits = doc["action_reason"], doc["special_care"]["hits"]
    escalate = doc["policy"]["escalate"]
    if why["rule"] == "review_band":
        near = ", ".join(doc["review_band"]["concepts"])
        return f"within the review band ({near} within {doc['review_band']['band']:g})"
    if hits and escalate not in (None, "allow"):
        return f"special care: {', '.join(hits)} (escalate {escalate})"
    if why["rule"] == "concept":
        return f"concept {why['concept']} has action {doc['action']}"
    return why["text"]
