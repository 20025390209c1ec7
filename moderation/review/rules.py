"""Review rules: who may claim, decide or reopen an item, when a held original may be released,
and the checks on names and reasons."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from moderation.errors import ModerationError
from moderation.review.queries import utc
from policy.vocabulary import DECIDED

MAX_NAME = 200  # review_items.reviewer / claim_owner are String(200)


class ReviewError(ModerationError):
    """A review request that cannot be carried out, worded for the reviewer."""


def reviewer_name(reviewer: str | None) -> str:
    """The stripped reviewer name; every change is attributed to a named person."""
    name = (reviewer or "").strip()
    if not name:
        raise ReviewError("a reviewer name is required")
    if len(name) > MAX_NAME:
        raise ReviewError(f"reviewer name is longer than {MAX_NAME} characters")
    return name


def required_reason(reason: str | None, what: str) -> str:
    """The stripped reason (rejects and reopens must say why)."""
    text = (reason or "").strip()
    if not text:
        raise ReviewError(f"a reason is required to {what} an item")
    return text


def _when(value: datetime | None) -> str:
    return utc(value).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "?"


def check_item_id(item_id: Any) -> None:
    """Refuse ids that are not integers before they reach SQL."""
    if not isinstance(item_id, int) or isinstance(item_id, bool):
        raise ReviewError(f"item id must be a whole number, not {item_id!r}")


def check_decidable(row: Any, reviewer: str, token: str | None, now: datetime) -> bool:
    """Raise unless `reviewer` may decide this item now; True when it is a direct decision."""
    item = row.id
    if row.status in DECIDED:
        raise ReviewError(
            f"item {item}: already {row.status} by {row.reviewer}; reopen it to review it again"
        )
    if row.status == "pending":
        if token:
            raise ReviewError(f"item {item}: is not claimed, so the token matches no claim")
        return True
    expires = row.claim_expires_at and utc(row.claim_expires_at)
    live = expires is not None and now < expires
    if row.claim_owner != reviewer:
        if live:
            raise ReviewError(f"item {item}: claimed by {row.claim_owner}, not {reviewer}")
        raise ReviewError(
            f"item {item}: lease of {row.claim_owner} expired at {_when(expires)}; claim it first"
        )
    if not live:
        raise ReviewError(f"item {item}: lease expired at {_when(expires)}; claim it again")
    if token and token != row.claim_token:
        raise ReviewError(
            f"item {item}: token does not match the current claim; use the token of your latest claim"
        )
    return False


def check_release(decision_id: str, held_path: str | None, item: Any) -> None:
    """Raise unless a decision's held original may go back to its user: its latest review item
    (`item`, None when it was never queued) is approved."""
    if held_path is None:
        raise ReviewError(f"decision {decision_id} has no held image")
    if item is None:
        raise ReviewError(
            f"decision {decision_id} was never queued for review; only approved images are released"
        )
    if item.status == "rejected":
        by = f" by {item.reviewer}" if item.reviewer else ""
        why = f": {item.reason}" if item.reason else ""
        raise ReviewError(
            f"decision {decision_id} was rejected{by}{why} (review item {item.id}); "
            "its original stays held"
        )
    if item.status != "approved":
        raise ReviewError(
            f"decision {decision_id} is still awaiting review (review item {item.id} is "
            f"{item.status}); its original is released only once approved"
        )
