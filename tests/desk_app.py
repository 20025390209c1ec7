"""Fixtures shared by the desk tests: a cheap argon2id hasher, a seeded desk app and logged-in
clients. The databases, on both backends, are tests/conftest.py's `db_url` (empty, migrated)."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient

from moderation.desk import accounts
from moderation.desk.app import DeskSettings, create_app
from tests.desk_factory import PASSWORD, add_users, csrf_of, seed_desk
from tests.review_factory import Clock

LEASE = 60


@pytest.fixture(autouse=True)
def cheap_passwords(monkeypatch):
    """argon2id with tiny costs: real hashes, without half a second per login."""
    monkeypatch.setattr(
        accounts, "HASHER", PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    )


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
