"""Webhooks: where verdicts go, and the delivery of the outbox that verdicts fill
(moderation/review/outbox.py) with HMAC-SHA256 signed bodies, retried with exponential backoff.

Delivery is at least once: a receiver may see a delivery again (same `X-Moderation-Delivery`
id) when it answered but the answer was lost; it should treat repeats as one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Engine, insert, select, update

from moderation.desk.accounts import DeskError
from moderation.desk.audit import record_event
from moderation.review.queries import iso
from moderation.storage.models import Webhook, WebhookDelivery, utcnow
from moderation.text import escape_controls

SIGNATURE_HEADER = "X-Moderation-Signature"  # "sha256=<hex HMAC of the body>"
DELIVERY_HEADER = "X-Moderation-Delivery"  # the outbox row id: the same on every retry
BACKOFF_BASE_S = 5.0  # knob: the first retry waits this long, each next one twice as long ...
BACKOFF_MAX_S = 3600.0  # ... up to this
TIMEOUT_S = 10.0  # knob: how long one delivery may take
BATCH = 100  # knob: deliveries tried per round
LOG = logging.getLogger(__name__)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")


def add_webhook(engine: Engine, url: str, secret_env: str, *, actor: str = "cli") -> int:
    """Register a receiver URL and the environment variable that holds its secret."""
    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DeskError(f'webhook URL "{escape_controls(url)}" must be an http(s) URL')
    if not ENV_NAME.fullmatch(secret_env or ""):
        raise DeskError(f'"{escape_controls(secret_env)}" is not an environment variable name')
    now = utcnow()
    with engine.begin() as conn:
        hook_id = conn.execute(
            insert(Webhook)
            .values(url=url, secret_env=secret_env, created_at=now)
            .returning(Webhook.id)
        ).scalar_one()
        record_event(conn, actor, "webhook_added", details={"webhook": hook_id, "url": url}, at=now)
    return int(hook_id)


def list_webhooks(engine: Engine) -> list[dict[str, Any]]:
    """Live webhooks with their outbox counts (never a secret)."""
    with engine.connect() as conn:
        hooks = conn.execute(
            select(Webhook.__table__).where(Webhook.removed_at.is_(None)).order_by(Webhook.id)
        ).all()
        out = []
        for h in hooks:
            rows = conn.execute(
                select(WebhookDelivery.delivered_at, WebhookDelivery.last_error).where(
                    WebhookDelivery.webhook_id == h.id
                )
            ).all()
            out.append(
                {
                    "id": h.id,
                    "url": h.url,
                    "secret_env": h.secret_env,
                    "created_at": iso(h.created_at),
                    "delivered": sum(r.delivered_at is not None for r in rows),
                    "waiting": sum(r.delivered_at is None for r in rows),
                }
            )
    return out


def remove_webhook(engine: Engine, hook_id: int, *, actor: str = "cli") -> None:
    """Stop delivering to a webhook (its undelivered verdicts stay in the outbox, unsent)."""
    now = utcnow()
    with engine.begin() as conn:
        found = conn.execute(
            update(Webhook)
            .where(Webhook.id == hook_id, Webhook.removed_at.is_(None))
            .values(removed_at=now)
        ).rowcount
        if not found:
            raise DeskError(f"no webhook {hook_id}")
        record_event(conn, actor, "webhook_removed", details={"webhook": hook_id}, at=now)


def sign(secret: bytes, body: bytes) -> str:
    """The signature header value of a body: `sha256=` and the hex HMAC-SHA256."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def backoff(attempts: int, base_s: float = BACKOFF_BASE_S, max_s: float = BACKOFF_MAX_S) -> float:
    """Seconds to wait after the `attempts`-th failed try."""
    return min(max_s, base_s * 2 ** max(0, attempts - 1))


def deliver_due(
    engine: Engine,
    now: datetime,
    client: httpx.Client,
    *,
    environ: Mapping[str, str] = os.environ,
    base_s: float = BACKOFF_BASE_S,
) -> dict[str, int]:
    """Try every delivery that is due; return how many were delivered and how many failed."""
    with engine.connect() as conn:
        due = conn.execute(
            select(
                WebhookDelivery.id,
                WebhookDelivery.body,
                WebhookDelivery.attempts,
                Webhook.url,
                Webhook.secret_env,
            )
            .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
            .where(
                WebhookDelivery.delivered_at.is_(None),
                WebhookDelivery.next_attempt_at <= now,
                Webhook.removed_at.is_(None),
            )
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
            .limit(BATCH)
        ).all()
    counts = {"delivered": 0, "failed": 0}
    for row in due:
        error = _post(client, row, environ)
        attempts = row.attempts + 1
        values: dict[str, Any] = {"attempts": attempts, "last_error": error}
        if error is None:
            values["delivered_at"] = now
            counts["delivered"] += 1
        else:
            values["next_attempt_at"] = now + timedelta(seconds=backoff(attempts, base_s))
            counts["failed"] += 1
        with engine.begin() as conn:
            conn.execute(
                update(WebhookDelivery).where(WebhookDelivery.id == row.id).values(**values)
            )
    return counts


def _post(client: httpx.Client, row: Any, environ: Mapping[str, str]) -> str | None:
    """POST one delivery; None when the receiver accepted it (2xx), else what went wrong."""
    secret = environ.get(row.secret_env)
    if not secret:
        return f"environment variable {row.secret_env} (the webhook's secret) is not set"
    body = row.body.encode("utf-8")
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(secret.encode("utf-8"), body),
        DELIVERY_HEADER: str(row.id),
    }
    try:
        response = client.post(row.url, content=body, headers=headers, timeout=TIMEOUT_S)
    except httpx.HTTPError as err:
        return f"{type(err).__name__}: {err}"[:500]
    if 200 <= response.status_code < 300:
        return None
    return f"HTTP {response.status_code}"


class Deliverer:
    """A background thread that delivers the outbox every `interval_s` seconds."""

    def __init__(
        self, engine: Engine, now: Callable[[], datetime], interval_s: float = 2.0
    ) -> None:
        self.engine, self.now, self.interval_s = engine, now, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="desk-webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=TIMEOUT_S + 5)

    def _run(self) -> None:
        with httpx.Client(follow_redirects=False) as client:
            while not self._stop.wait(self.interval_s):
                try:
                    deliver_due(self.engine, self.now(), client)
                except Exception as err:  # noqa: BLE001 - a database blip must not end delivery
                    LOG.warning("webhook delivery round failed (retried): %s", err)
