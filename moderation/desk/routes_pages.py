"""The pages a reviewer reads: queue, item, reopened items, decisions, stats, audit."""

from __future__ import annotations

import io
from datetime import datetime

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from moderation.decisions.browser import DecisionError
from moderation.desk.access import decision_visible, visible_item
from moderation.desk.audit import EXPORT_FORMATS, audit_events, write_export
from moderation.desk.documents import decision_document, item_document
from moderation.desk.listing import (
    desk_stats,
    earlier_verdicts,
    my_claims,
    queue_rows,
    reopened_rows,
    revealed,
)
from moderation.desk.sessions import Viewer
from moderation.desk.web import (
    ItemId,
    admin_only,
    desk_of,
    error_page,
    render,
    see_other,
    signed_in,
)
from moderation.times import parse_time, utc
from policy.vocabulary import REVIEW_STATUSES

router = APIRouter()
# Notes a redirect may ask a page to show (by code: no text is reflected from the URL).
NOTES = {
    "empty": "Nothing to claim: no pending item you may see.",
    "claimed": "Claimed.",
    "decided": "Verdict recorded.",
    "released": "Claim released: the item is back in the queue.",
    "renewed": "Lease renewed.",
}
SHORTCUTS = (
    ("a", "approve (with the labels ticked)"),
    ("r", "reject: type the reason, then Enter"),
    ("v", "reveal the image (recorded in the audit)"),
    ("n", "next item"),
    ("1-9", "tick or untick the concept labels"),
    ("e", "renew the lease"),
    ("u", "release the claim"),
    ("?", "focus this list"),
)


def _opt(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


@router.get("/")
def queue_page(
    request: Request,
    status: str = "pending",
    policy: str = "",
    concept: str = "",
    note: str = "",
    viewer: Viewer = Depends(signed_in),
):
    desk = desk_of(request)
    if status not in ("", *REVIEW_STATUSES):
        return error_page(request, viewer, 400, f"unknown status; choose from {REVIEW_STATUSES}")
    now = desk.now()
    with desk.engine.connect() as conn:
        rows = queue_rows(
            conn, viewer, now, status=status or None, policy=_opt(policy), concept=_opt(concept)
        )
        mine = my_claims(conn, viewer, now)
    return render(
        request,
        "queue.html",
        viewer=viewer,
        rows=rows,
        mine=mine,
        filters={"status": status, "policy": policy, "concept": concept},
        statuses=REVIEW_STATUSES,
        note=NOTES.get(note),
    )


@router.get("/next")
def next_item(request: Request, viewer: Viewer = Depends(signed_in)):
    """The viewer's next live claim; else claim one more (as `review claim -n 1`).

    A GET that may claim: the keyboard's `n` is a plain link. Another site cannot make a
    browser do it for a reviewer (the session cookie is SameSite=Strict), and a claim is
    harmless to the reviewer's own queue (it expires or is released)."""
    desk = desk_of(request)
    with desk.engine.connect() as conn:
        mine = my_claims(conn, viewer, desk.now())
    if mine:
        return see_other(f"/items/{mine[0].id}")
    claims = desk.queue.claim(viewer.name, 1, special_care=viewer.special_care)
    if not claims:
        return see_other("/?note=empty")
    return see_other(f"/items/{claims[0].item_id}")


@router.get("/items/{item_id}")
def item_page(
    request: Request, item_id: ItemId, note: str = "", viewer: Viewer = Depends(signed_in)
):
    desk = desk_of(request)
    now = desk.now()
    with desk.engine.connect() as conn:
        row = visible_item(conn, viewer, item_id)
        if row is None:
            return error_page(request, viewer, 404, f"no review item {item_id}")
        doc = item_document(conn, item_id, now)
        shown = revealed(conn, viewer, item_id)
        earlier = earlier_verdicts(conn, doc)
    item = doc["item"]
    mine = item["status"] == "claimed" and item["claim_owner"] == viewer.name and item["lease_live"]
    remaining = None
    if mine and row.claim_expires_at is not None:
        remaining = max(0, int((utc(row.claim_expires_at) - now).total_seconds()))
    # Labels in policy order (the document lists concepts nearest first): keys 1-9 name the
    # same concept on every item of a policy.
    by_policy = sorted(doc["concepts"], key=lambda c: c["index"])
    labels = [c["name"] for c in by_policy] + [c["name"] for c in doc["special_care"]["concepts"]]
    ticked = set(doc["fired"]) | set(doc["special_care"]["hits"])
    return render(
        request,
        "item.html",
        viewer=viewer,
        doc=doc,
        item=item,
        mine=mine,
        token=row.claim_token if mine else None,
        remaining=remaining,
        revealed=shown,
        earlier=earlier,
        labels=labels,
        ticked=ticked,
        shortcuts=SHORTCUTS,
        note=NOTES.get(note),
    )


@router.get("/reopened")
def reopened_page(request: Request, viewer: Viewer = Depends(signed_in)):
    desk = desk_of(request)
    with desk.engine.connect() as conn:
        rows = reopened_rows(conn, viewer)
    return render(request, "reopened.html", viewer=viewer, rows=rows)


@router.get("/decisions")
def decision_lookup(request: Request, id: str = "", viewer: Viewer = Depends(signed_in)):
    """The decision page's lookup form; a given id (or prefix) goes to its page."""
    given = id.strip()
    if given:
        desk = desk_of(request)
        with desk.engine.connect() as conn:
            try:
                doc = decision_document(conn, given)
            except DecisionError:
                doc = None
            if doc is None or not decision_visible(conn, viewer, doc["decision_id"]):
                return error_page(request, viewer, 404, "no such decision")
        return see_other(f"/decisions/{doc['decision_id']}")
    return render(request, "lookup.html", viewer=viewer)


@router.get("/decisions/{decision_id}")
def decision_page(request: Request, decision_id: str, viewer: Viewer = Depends(signed_in)):
    desk = desk_of(request)
    with desk.engine.connect() as conn:
        try:
            doc = decision_document(conn, decision_id)
        except DecisionError:
            doc = None
        if doc is None or not decision_visible(conn, viewer, doc["decision_id"]):
            return error_page(request, viewer, 404, "no such decision")
    return render(request, "decision.html", viewer=viewer, doc=doc)


@router.get("/stats")
def stats_page(request: Request, viewer: Viewer = Depends(signed_in)):
    desk = desk_of(request)
    with desk.engine.connect() as conn:
        stats = desk_stats(conn, desk.now())
    return render(request, "stats.html", viewer=viewer, stats=stats)


def _audit_filters(actor: str, event: str, item: str, since: str) -> dict:
    filters: dict = {"actor": _opt(actor), "event": _opt(event)}
    item = item.strip()
    if item and not (item.isdigit() and 1 <= int(item) < 2**31):
        raise ValueError(f"item must be a review item id, not {item[:40]!r}")
    filters["item_id"] = int(item) if item else None
    start: datetime | None = None
    if since.strip():
        start = parse_time(since, what="since")  # ValueError: shown as a 400 page
    filters["since"] = start
    return filters


@router.get("/audit")
def audit_page(
    request: Request,
    actor: str = "",
    event: str = "",
    item: str = "",
    since: str = "",
    viewer: Viewer = Depends(admin_only),
):
    desk = desk_of(request)
    try:
        filters = _audit_filters(actor, event, item, since)
    except ValueError as err:
        return error_page(request, viewer, 400, str(err))
    with desk.engine.connect() as conn:
        rows = audit_events(conn, **filters, limit=500)
    shown = {"actor": actor, "event": event, "item": item, "since": since}
    return render(request, "audit.html", viewer=viewer, rows=rows, filters=shown)


@router.get("/audit/export")
def audit_export(
    request: Request,
    format: str = "csv",
    actor: str = "",
    event: str = "",
    item: str = "",
    since: str = "",
    viewer: Viewer = Depends(admin_only),
):
    desk = desk_of(request)
    if format not in EXPORT_FORMATS:
        return error_page(request, viewer, 400, f"format must be one of {EXPORT_FORMATS}")
    try:
        filters = _audit_filters(actor, event, item, since)
    except ValueError as err:
        return error_page(request, viewer, 400, str(err))
    with desk.engine.connect() as conn:
        rows = audit_events(conn, **filters, limit=5000)
    out = io.StringIO()
    write_export(rows, format, out)
    media = "text/csv" if format == "csv" else "application/x-ndjson"
    return Response(
        out.getvalue(),
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="desk-audit.{format}"'},
    )
