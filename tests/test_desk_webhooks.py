"""Webhooks: verdicts (CLI and queue alike) fill the outbox in their own transaction; delivery
signs bodies with HMAC-SHA256 and retries with backoff until a failing receiver recovers."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from moderation.cli import main
from moderation.desk.webhooks import SIGNATURE_HEADER, add_webhook, backoff, deliver_due
from moderation.review.queue import ReviewQueue
from moderation.review.rules import ReviewError
from moderation.storage.models import PolicyRow, WebhookDelivery
from moderation.storage.schema import get_engine
from moderation.times import utcnow
from tests.desk_app import cheap_passwords, clock  # noqa: F401  (fixtures)
from tests.desk_factory import seed_desk

SECRET = "s3cret-for-tests"


class Receiver:
    """A local HTTP receiver that answers 500 to its first `failures` requests, then 204."""

    def __init__(self, failures: int) -> None:
        self.failures, self.received = failures, []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                status = 500 if len(receiver.received) <= receiver.failures else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver(failures=2)
    yield r
    r.close()


def test_verdicts_reach_a_receiver_that_fails_then_recovers(db_url, tmp_path, clock, receiver):
    data = seed_desk(db_url, tmp_path / "held", ordinary=3)
    engine = get_engine(db_url)
    add_webhook(engine, receiver.url, "DESK_HOOK_SECRET")
    first, second, third = data.ordinary
    # A CLI verdict (batch) and a queue verdict both queue a delivery.
    result = CliRunner().invoke(
        main,
        ["review", "approve", str(first), str(second), "--reviewer", "alice", "--db", db_url],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    queue = ReviewQueue(db_url, now=clock)
    queue.reject(third, "bob", "gore", concepts=["gore"])
    # A refused verdict queues nothing (same transaction).
    with pytest.raises(ReviewError):
        queue.reject(third, "bob", "again")
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(WebhookDelivery)).scalar_one() == 3
        digest = conn.execute(select(PolicyRow.digest)).scalar_one()

    env = {"DESK_HOOK_SECRET": SECRET}
    now = utcnow()  # the CLI's verdicts were queued at the real time, the queue's at the clock's
    with httpx.Client() as client:
        # Two rounds fail (HTTP 500 to the first two requests), then the receiver recovers.
        assert deliver_due(engine, now, client, environ=env) == {"delivered": 1, "failed": 2}
        assert deliver_due(engine, now, client, environ=env) == {"delivered": 0, "failed": 0}
        now += timedelta(seconds=backoff(1))
        assert deliver_due(engine, now, client, environ=env) == {"delivered": 2, "failed": 0}
    with engine.connect() as conn:
        rows = conn.execute(select(WebhookDelivery.attempts, WebhookDelivery.delivered_at)).all()
    assert all(r.delivered_at is not None for r in rows)
    assert sorted(r.attempts for r in rows) == [1, 2, 2]

    delivered = {}
    for headers, body in receiver.received:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers[SIGNATURE_HEADER] == expected
        doc = json.loads(body)
        delivered[doc["item_id"]] = doc
    assert set(delivered) == {first, second, third}
    assert delivered[third]["verdict"] == "rejected"
    assert delivered[third]["labels"]["shows"] == ["gore"]
    assert delivered[third]["policy_digest"] == digest
    assert delivered[first]["decision_id"] == data.decision_of[first]
    assert delivered[first]["verdict"] == "approved"


def test_a_missing_secret_or_a_down_receiver_is_retried_later(db_url, tmp_path, clock):
    data = seed_desk(db_url, tmp_path / "held", ordinary=1)
    engine = get_engine(db_url)
    add_webhook(engine, "http://127.0.0.1:9/unreachable", "DESK_HOOK_SECRET")
    ReviewQueue(db_url, now=clock).approve(data.ordinary[0], "alice")
    now = clock()
    with httpx.Client() as client:
        assert deliver_due(engine, now, client, environ={}) == {"delivered": 0, "failed": 1}
        with engine.connect() as conn:
            error = conn.execute(select(WebhookDelivery.last_error)).scalar_one()
        assert "DESK_HOOK_SECRET" in error and SECRET not in error
        now += timedelta(seconds=backoff(1))
        env = {"DESK_HOOK_SECRET": SECRET}
        assert deliver_due(engine, now, client, environ=env) == {"delivered": 0, "failed": 1}
    with engine.connect() as conn:
        row = conn.execute(select(WebhookDelivery.__table__)).one()
    assert row.delivered_at is None and row.attempts == 2
    assert row.next_attempt_at == now + timedelta(seconds=backoff(2))
    assert backoff(2) == 2 * backoff(1) and backoff(100) == 3600.0


def test_the_running_desk_delivers_its_verdicts(db_url, tmp_path, monkeypatch):
    """A verdict given in the desk reaches the receiver through the desk's own deliverer."""
    import time

    from fastapi.testclient import TestClient

    from moderation.desk.app import DeskSettings, create_app
    from tests.desk_app import login
    from tests.desk_factory import add_users

    receiver = Receiver(failures=0)
    try:
        data = seed_desk(db_url, tmp_path / "held", ordinary=1)
        add_users(db_url, {"alice": "reviewer"})
        add_webhook(get_engine(db_url), receiver.url, "DESK_HOOK_SECRET")
        monkeypatch.setenv("DESK_HOOK_SECRET", SECRET)
        settings = DeskSettings(
            db_url=db_url, held_dir=tmp_path / "held", webhooks=True, webhook_interval_s=0.1
        )
        app = create_app(settings)
        with TestClient(app):  # runs the lifespan: the deliverer thread
            alice = login(app, "alice")
            page = alice.get("/next")
            item = int(page.headers["location"].split("/")[2])
            html = alice.get(f"/items/{item}").text
            token = html.split('name="token" value="')[1].split('"')[0]
            csrf = html.split('name="csrf" value="')[1].split('"')[0]
            alice.post(
                f"/items/{item}/verdict", data={"csrf": csrf, "token": token, "verdict": "approve"}
            )
            deadline = time.monotonic() + 15
            while not receiver.received and time.monotonic() < deadline:
                time.sleep(0.05)
        assert len(receiver.received) == 1
        doc = json.loads(receiver.received[0][1])
        assert (doc["item_id"], doc["verdict"]) == (data.ordinary[0], "approved")
    finally:
        receiver.close()
