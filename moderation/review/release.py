"""Held originals go back to the caller only through the review side: `release`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moderation.errors import ModerationError


def release(db: str, held_dir: str | Path | Any, decision_id: str) -> bytes:
    """The held original (PNG bytes) of `decision_id`, once a reviewer approved its item.

    db: the decision log's database URL; held_dir: its held folder (or a `HeldStore`). Raises
    ReviewError while the item is pending, rejected, or was never queued."""
    from moderation.review.queue import ReviewQueue
    from moderation.storage.held import HeldStore

    held = held_dir if isinstance(held_dir, HeldStore) else HeldStore(held_dir)
    return ReviewQueue(db).release(decision_id, held)


def release_from_log(log: Any, decision_id: str) -> bytes:
    """`release` for the decision log an entry point writes to (flushed first: a decision still
    queued for writing is not in the database yet)."""
    if log is None:
        raise ModerationError("this moderator logs no decisions, so it holds no images")
    log.flush()
    return release(log.url, log.held, decision_id)
