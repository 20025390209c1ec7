"""`review user ...`, `review webhook ...`, batch verdicts, `review list` after a lease expired,
and migration 0008 up and down with rows on both backends."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from click.testing import CliRunner
from sqlalchemy import func, inspect, select

from moderation.cli import main
from moderation.desk.accounts import list_users
from moderation.desk.sessions import login, viewer_of
from moderation.review.queue import ReviewQueue
from moderation.storage import db, downgrade, upgrade
from moderation.storage.models import DeskEvent, DeskUser, ReviewItem
from moderation.storage.schema import get_engine
from moderation.times import utcnow
from tests.desk_app import cheap_passwords, clock  # noqa: F401  (fixtures)
from tests.desk_factory import seed_desk
from tests.desk_server import free_port

ROOT = Path(__file__).resolve().parent.parent

DESK_TABLES = {"desk_users", "desk_sessions", "desk_events", "webhooks", "webhook_outbox"}


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


def test_user_commands(db_url):
    get_engine(db_url)  # checks the schema (both databases are migrated by the fixture)
    password = "a long enough password\n"
    result = run(
        "review",
        "user",
        "add",
        "alice",
        "--role",
        "reviewer",
        "--password-stdin",
        "--db",
        db_url,
        input=password,
    )
    assert result.exit_code == 0 and result.output == "Added reviewer alice.\n", result.output
    again = run(
        "review",
        "user",
        "add",
        "alice",
        "--role",
        "admin",
        "--password-stdin",
        "--db",
        db_url,
        input=password,
    )
    assert again.exit_code == 1 and 'user "alice" already exists' in again.output
    short = run(
        "review",
        "user",
        "add",
        "bob",
        "--role",
        "reviewer",
        "--password-stdin",
        "--db",
        db_url,
        input="short\n",
    )
    assert short.exit_code == 1 and "at least 10 characters" in short.output
    bad = run("review", "user", "add", "bob", "--role", "boss", "--password-stdin", "--db", db_url)
    assert bad.exit_code == 2
    prompted = run(
        "review",
        "user",
        "add",
        "carol",
        "--role",
        "special-care",
        "--db",
        db_url,
        input="another good password\nanother good password\n",
    )
    assert prompted.exit_code == 0, prompted.output

    listed = json.loads(run("review", "user", "list", "--json", "--db", db_url).output)
    assert [(u["name"], u["role"], u["disabled"]) for u in listed] == [
        ("alice", "reviewer", False),
        ("carol", "special-care", False),
    ]
    assert "hash" not in json.dumps(listed) and "argon2" not in json.dumps(listed)
    engine = get_engine(db_url)
    with engine.connect() as conn:
        stored = conn.execute(
            select(DeskUser.password_hash).where(DeskUser.name == "alice")
        ).scalar_one()
    assert stored.startswith("$argon2id$") and "long enough" not in stored

    token = login(engine, "alice", "a long enough password", "test", utcnow())
    result = run(
        "review",
        "user",
        "passwd",
        "alice",
        "--password-stdin",
        "--db",
        db_url,
        input="a brand new password\n",
    )
    assert result.exit_code == 0, result.output
    with engine.connect() as conn:
        assert viewer_of(conn, token, utcnow()) is None, "a password change ends sessions"
    token = login(engine, "alice", "a brand new password", "test", utcnow())
    assert run("review", "user", "disable", "alice", "--db", db_url).exit_code == 0
    with engine.connect() as conn:
        assert viewer_of(conn, token, utcnow()) is None, "disabling ends sessions"
        events = [e for (e,) in conn.execute(select(DeskEvent.event).order_by(DeskEvent.id))]
    assert events[:2] == ["user_added", "user_added"] and "user_disabled" in events
    assert [u["disabled"] for u in list_users(engine)] == [True, False]
    missing = run("review", "user", "disable", "nobody", "--db", db_url)
    assert missing.exit_code == 1 and 'no user "nobody"' in missing.output


def test_webhook_commands(db_url):
    get_engine(db_url)  # checks the schema (both databases are migrated by the fixture)
    added = run(
        "review",
        "webhook",
        "add",
        "https://app.example/hook",
        "--secret-env",
        "HOOK_SECRET",
        "--db",
        db_url,
    )
    assert added.exit_code == 0 and added.output.startswith("Added webhook 1:"), added.output
    bad = run("review", "webhook", "add", "ftp://x", "--secret-env", "HOOK", "--db", db_url)
    assert bad.exit_code == 1 and "must be an http(s) URL" in bad.output
    bad = run("review", "webhook", "add", "https://x", "--secret-env", "NOT A NAME", "--db", db_url)
    assert bad.exit_code == 1 and "not an environment variable name" in bad.output
    listed = json.loads(run("review", "webhook", "list", "--json", "--db", db_url).output)
    assert [(h["id"], h["url"], h["secret_env"]) for h in listed] == [
        (1, "https://app.example/hook", "HOOK_SECRET")
    ]
    assert run("review", "webhook", "remove", "1", "--db", db_url).exit_code == 0
    assert run("review", "webhook", "list", "--db", db_url).output == "No webhooks.\n"
    again = run("review", "webhook", "remove", "1", "--db", db_url)
    assert again.exit_code == 1 and "no webhook 1" in again.output


def test_batch_verdicts(db_url, tmp_path):
    data = seed_desk(db_url, tmp_path / "held", ordinary=4)
    a, b, c, d = data.ordinary
    result = run("review", "approve", str(a), str(b), "--reviewer", "alice", "--db", db_url)
    assert result.exit_code == 0 and result.output == f"Approved item {a}.\nApproved item {b}.\n"
    result = run(
        "review",
        "reject",
        str(c),
        str(a),
        str(d),
        "--reviewer",
        "bob",
        "--reason",
        "gore",
        "--db",
        db_url,
    )
    assert result.exit_code == 1
    assert f"Rejected item {c}." in result.output and f"Rejected item {d}." in result.output
    assert f"item {a}: already approved by alice" in result.output
    assert "1 of 3 items were not decided" in result.output
    token = run(
        "review", "approve", str(a), str(b), "--reviewer", "x", "--token", "t", "--db", db_url
    )
    assert token.exit_code == 2 and "--token names one claim" in token.output


def test_list_shows_an_expired_lease_as_pending(db_url, tmp_path, clock):
    data = seed_desk(db_url, tmp_path / "held", ordinary=2)
    queue = ReviewQueue(db_url, lease_seconds=60, now=clock)  # the clock is in 2024: long expired
    (claim,) = queue.claim("alice", 1)
    listed = json.loads(
        run("review", "list", "--status", "pending", "--json", "--db", db_url).output
    )
    assert sorted(i["id"] for i in listed) == sorted(data.ordinary)
    expired = next(i for i in listed if i["id"] == claim.item_id)
    assert expired["status"] == "pending" and expired["claim_owner"] == "alice"
    claimed = run("review", "list", "--status", "claimed", "--json", "--db", db_url).output
    assert json.loads(claimed) == []
    # While the lease lasts it is claimed (the queue's own clock).
    assert [i.status for i in queue.list(status="claimed")] == ["claimed"]


def test_migration_0008_up_and_down_with_rows(db_url, tmp_path):
    migration = importlib.import_module("migrations.versions.0008_review_desk")
    data = seed_desk(db_url, tmp_path / "held", ordinary=2)
    assert (
        run(
            "review",
            "user",
            "add",
            "alice",
            "--role",
            "admin",
            "--password-stdin",
            "--db",
            db_url,
            input="a long enough password\n",
        ).exit_code
        == 0
    )
    downgrade(db_url, migration.down_revision)
    db.dispose(db_url)
    with db.engine_for(db_url).connect() as conn:
        tables = set(inspect(conn).get_table_names())
        items = conn.execute(select(func.count()).select_from(ReviewItem)).scalar_one()
    assert not tables & DESK_TABLES and items == len(data.ordinary)
    upgrade(db_url, "head")
    db.dispose(db_url)
    with db.engine_for(db_url).connect() as conn:
        assert DESK_TABLES <= set(inspect(conn).get_table_names())
        assert conn.execute(select(func.count()).select_from(DeskUser)).scalar_one() == 0


def test_serve_command_answers_on_loopback(tmp_path):
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    upgrade(url)  # readers (get_engine, the desk's queue) open existing databases only
    db.dispose(url)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moderation",
            "review",
            "serve",
            "--db",
            url,
            "--port",
            str(port),
            "--no-webhooks",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(server.stdout.read().decode()) from None
                time.sleep(0.2)
        assert response.status_code == 303 and response.headers["location"] == "/login"
        assert response.headers["x-frame-options"] == "DENY"
        assert "server" not in response.headers
    finally:
        server.terminate()
        server.wait(timeout=20)
    missing = run("review", "serve", "--db", f"sqlite:///{tmp_path / 'nope.db'}")
    assert missing.exit_code == 1 and "no database at" in missing.output
