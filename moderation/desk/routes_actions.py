"""What a reviewer does: claim, reveal, decide, renew or release a claim; and the image."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response
from sqlalchemy import select

from moderation.desk.access import visible_item
from moderation.desk.audit import record_event
from moderation.desk.images import blurred, held_original
from moderation.desk.leases import release_claim, renew
from moderation.desk.listing import revealed
from moderation.desk.sessions import Viewer
from moderation.desk.web import ItemId, csrf_checked, desk_of, error_page, see_other, signed_in
from moderation.errors import ModerationError
from moderation.storage.models import DecisionRow

router = APIRouter()
MAX_CLAIM_PAGE = 50  # knob: most items one "claim next N" takes


@router.post("/claim")
def claim(request: Request, n: int = Form(1), viewer: Viewer = Depends(csrf_checked)):
    """Claim the next `n` items the viewer may see, exactly as `review claim` leases them."""
    desk = desk_of(request)
    if not 1 <= n <= MAX_CLAIM_PAGE:
        return error_page(request, viewer, 400, f"claim 1 to {MAX_CLAIM_PAGE} items at a time")
    claims = desk.queue.claim(viewer.name, n, special_care=viewer.special_care)
    if not claims:
        return see_other("/?note=empty")
    return see_other(f"/items/{claims[0].item_id}?note=claimed")


def _missing(request: Request, viewer: Viewer, item_id: int):
    return error_page(request, viewer, 404, f"no review item {item_id}")


@router.post("/items/{item_id}/reveal")
def reveal(request: Request, item_id: ItemId, viewer: Viewer = Depends(csrf_checked)):
    """Show this item's image unblurred to the viewer, from now on; recorded in the audit."""
    desk = desk_of(request)
    with desk.engine.begin() as conn:
        row = visible_item(conn, viewer, item_id)
        if row is None:
            return _missing(request, viewer, item_id)
        if not revealed(conn, viewer, item_id):
            record_event(
                conn,
                viewer.name,
                "reveal",
                item_id=item_id,
                decision_id=row.decision_id,
                at=desk.now(),
            )
    return see_other(f"/items/{item_id}")


@router.post("/items/{item_id}/verdict")
def verdict(
    request: Request,
    item_id: ItemId,
    verdict: str = Form(...),
    token: str = Form(""),
    reason: str = Form(""),
    concept: list[str] = Form([]),
    labels_explicit: str = Form("0"),
    viewer: Viewer = Depends(csrf_checked),
):
    """Approve or reject the viewer's claimed item, with labels and a reason."""
    desk = desk_of(request)
    with desk.engine.connect() as conn:
        if visible_item(conn, viewer, item_id) is None:
            return _missing(request, viewer, item_id)
    if verdict not in ("approve", "reject"):
        return error_page(request, viewer, 400, "verdict must be approve or reject")
    if not token:
        return error_page(request, viewer, 409, f"item {item_id}: claim it before deciding it")
    concepts = list(concept) if labels_explicit == "1" else None
    try:
        if verdict == "approve":
            desk.queue.approve(item_id, viewer.name, token=token, reason=reason, concepts=concepts)
        else:
            desk.queue.reject(item_id, viewer.name, reason, token=token, concepts=concepts)
    except ModerationError as err:
        return error_page(request, viewer, 409, str(err))
    return see_other("/next")


@router.post("/items/{item_id}/renew")
def renew_lease(
    request: Request, item_id: ItemId, token: str = Form(""), viewer: Viewer = Depends(csrf_checked)
):
    return _on_claim(request, viewer, item_id, renew, token, f"/items/{item_id}?note=renewed")


@router.post("/items/{item_id}/release")
def release(
    request: Request, item_id: ItemId, token: str = Form(""), viewer: Viewer = Depends(csrf_checked)
):
    return _on_claim(request, viewer, item_id, release_claim, token, "/?note=released")


def _on_claim(request: Request, viewer: Viewer, item_id: int, act: Callable, token: str, done: str):
    """`act(queue, item_id, viewer, token)` (leases.renew, leases.release_claim) on an item the viewer may see (else 404), then to `done`; a refusal
    (ModerationError: not the owner, lease expired, wrong token) is a 409 page."""
    desk = desk_of(request)
    with desk.engine.connect() as conn:
        if visible_item(conn, viewer, item_id) is None:
            return _missing(request, viewer, item_id)
    try:
        act(desk.queue, item_id, viewer.name, token)
    except ModerationError as err:
        return error_page(request, viewer, 409, str(err))
    return see_other(done)


@router.get("/items/{item_id}/image")
def image(request: Request, item_id: ItemId, viewer: Viewer = Depends(signed_in)):
    """The item's held image: blurred greyscale unless the viewer revealed it; checked against
    its sha256 first; never cached."""
    desk = desk_of(request)
    with desk.engine.connect() as conn:
        row = visible_item(conn, viewer, item_id)
        if row is None:
            return Response(status_code=404)
        held_path = conn.execute(
            select(DecisionRow.held_path).where(DecisionRow.id == row.decision_id)
        ).scalar_one_or_none()
        clear = revealed(conn, viewer, item_id)
    if not held_path:
        return Response(status_code=404)
    try:
        data = held_original(desk.held, held_path)
    except ModerationError:
        # Missing or corrupt (sha256 mismatch): nothing is served.
        return Response(status_code=404)
    return Response(data if clear else blurred(data, viewer.image_mode), media_type="image/png")
