"""The webhook outbox: every verdict queues one delivery per configured webhook, in the verdict's
own transaction, so that a verdict is never lost because the app that made the image was down.
moderation/desk/webhooks.py signs and delivers them, with retries."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select

from moderation.review.queries import iso
from moderation.storage.models import DecisionRow, Webhook, WebhookDelivery


def verdict_body(item: Any, status: str, labels: dict[str, Any], digest: str, at: datetime) -> str:
    """The JSON a webhook receives (signed as these exact bytes)."""
    return json.dumps(
        {
            "event": "review.verdict",
            "decision_id": item.decision_id,
            "item_id": item.id,
            "verdict": status,
            "labels": labels,
            "policy_digest": digest,
            "decided_at": iso(at),
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def enqueue_verdict(
    conn: Connection, item: Any, status: str, labels: dict[str, Any], at: datetime
) -> int:
    """Queue the verdict on `item` for every live webhook; return how many deliveries."""
    hooks = conn.execute(select(Webhook.id).where(Webhook.removed_at.is_(None))).scalars().all()
    if not hooks:
        return 0
    digest = conn.execute(
        select(DecisionRow.policy_digest).where(DecisionRow.id == item.decision_id)
    ).scalar_one()
    body = verdict_body(item, status, labels, digest, at)
    rows = [
        {
            "webhook_id": hook,
            "item_id": item.id,
            "decision_id": item.decision_id,
            "body": body,
            "created_at": at,
            "attempts": 0,
            "next_attempt_at": at,
        }
        for hook in hooks
    ]
    conn.execute(insert(WebhookDelivery), rows)
    return len(rows)
