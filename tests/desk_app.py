"""Fixtures shared by the desk tests: a cheap argon2id hasher, databases on both backends
(with the desk's tables emptied between tests), a seeded desk app and logged-in clients."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient

from moderation.desk import accounts
from moderation.desk.app import DeskSettings, create_app
from moderation.storage import db
from tests.desk_factory import PASSWORD, add_users, csrf_of, seed_desk
from tests.review_factory import PG_URL, Clock, pg_database, sqlite_url

LEASE = 60
DESK_TABLES = (
    "webhook_outbox",
    "webhooks",
    "desk_events",
    "desk_sessions",
    "desk_users",
    "review_events",
    "review_items",
    "decisions",
    "policies",
)


@pytest.fixture(autouse=True)
def cheap_passwords(monkeypatch):
    """argon2id with tiny costs: real hashes, without half a second per login."""
    monkeypatch.setattr(
        accounts, "HASHER", PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    )


@pytest.fixture(scope="module")
def pg_url():
    if not PG_URL:
        pytest.skip("MODERATION_TEST_PG_URL is not set")
    with pg_database("desk") as url:
        yield url


def empty(url: str) -> None:
    with db.engine_for(url).begin() as conn:
        for table in DESK_TABLES:
            conn.exec_driver_sql(f"DELETE FROM {table}")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        url = sqlite_url(tmp_path)
        yield url
        db.dispose(url)
        return
    url = request.getfixturevalue("pg_url")
    empty(url)
    yield url


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def seeded(db_url, tmp_path):
    data = seed_desk(db_url, tmp_path / "held", ordinary=4, special=2, meta={"prompt": "<b>x</b>"})
    add_users(db_url)
    return data


@pytest.fixture
def app(db_url, tmp_path, clock, seeded):
    settings = DeskSettings(
        db_url=db_url, held_dir=tmp_path / "held", lease_seconds=LEASE, now=clock, webhooks=False
    )
    return create_app(settings)


def login(app, name: str, password: str = PASSWORD) -> TestClient:
    client = TestClient(app, follow_redirects=False)
    page = client.get("/login")
    response = client.post(
        "/login", data={"name": name, "password": password, "csrf": csrf_of(page.text)}
    )
    assert response.status_code == 303, response.text
    return client


def csrf(client: TestClient) -> str:
    return csrf_of(client.get("/").text)
