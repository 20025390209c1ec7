"""The review desk end to end: the real server (uvicorn) driven with Playwright on Debian's
Chromium, on SQLite and PostgreSQL: log in, claim, blurred images and audited reveals,
keyboard verdicts with labels, two reviewers, late verdicts, special care, CSRF, no content
without a session."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image
from sqlalchemy import select

from moderation.decisions.document import review_item_document
from moderation.desk.app import DeskSettings, create_app
from moderation.storage.models import DeskEvent, ReviewItem
from moderation.storage.schema import get_engine
from tests.desk_app import (  # noqa: F401  (fixtures)
    LEASE,
    cheap_passwords,
    clock,
)
from tests.desk_factory import PASSWORD, add_users, seed_desk
from tests.desk_server import browser, serving  # noqa: F401
from tests.review_factory import sqlite_url

pytestmark = pytest.mark.browser
SCREENSHOT_ENV = "MODERATION_DESK_SCREENSHOT"  # write the item page's screenshot here (docs)


@pytest.fixture
def desk(db_url, tmp_path, clock):
    data = seed_desk(
        db_url, tmp_path / "held", ordinary=6, special=2, meta={"prompt": "a <i>test</i> image"}
    )
    add_users(db_url)
    settings = DeskSettings(
        db_url=db_url, held_dir=tmp_path / "held", lease_seconds=LEASE, now=clock, webhooks=False
    )
    with serving(create_app(settings)) as base:
        yield base, data


def log_in(browser, base: str, name: str):
    context = browser.new_context(base_url=base, viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.goto("/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", PASSWORD)
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.url == base + "/", page.content()
    return context, page


def item_id(page) -> int:
    return int(page.url.split("/items/")[1].split("?")[0])


def image_bytes(page) -> bytes:
    src = page.get_attribute("#item-image", "src")
    response = page.request.get(src)
    assert response.status == 200 and response.headers["cache-control"] == "no-store"
    return response.body()


def save_screenshot(png: bytes, path: str) -> None:
    """A small PNG of the page for the docs (64 colours are plenty for a form and a table)."""
    Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=64).save(path, optimize=True)


def claims_of(page) -> set[int]:
    """The item ids of a reviewer's live claims, from the queue page."""
    page.goto("/")
    return {
        int(a.get_attribute("href").split("/")[2]) for a in page.query_selector_all(".claims a")
    }


def test_reviewer_works_items_with_the_keyboard(browser, desk, db_url):
    base, data = desk
    context, page = log_in(browser, base, "alice")
    # CSP violations (an inline script, say) and script errors show up here.
    problems = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    with page.expect_navigation():
        page.keyboard.press("c")  # claim next 10
    first = item_id(page)
    assert first in data.ordinary
    assert "approve (with the labels ticked)" in page.inner_text("#shortcuts")
    assert "a <i>test</i> image" in page.inner_text("#meta")  # shown as text, not markup
    # The decision document's concepts, nearest first, and what set the action.
    with get_engine(db_url).connect() as conn:
        doc = review_item_document(conn, first)
    rows = page.query_selector_all("#concepts tbody tr")
    assert [r.get_attribute("data-concept") for r in rows] == [c["name"] for c in doc["concepts"]]
    assert page.inner_text("#action-reason") == doc["action_reason"]["text"]

    # Blurred and greyscale until revealed: the served bytes, not a CSS class.
    blurred = image_bytes(page)
    assert blurred != data.image_of[first]
    assert Image.open(io.BytesIO(blurred)).mode == "L"
    if os.environ.get(SCREENSHOT_ENV):
        save_screenshot(page.screenshot(full_page=False), os.environ[SCREENSHOT_ENV])
    with page.expect_navigation():
        page.keyboard.press("v")
    assert image_bytes(page) == data.image_of[first]
    engine = get_engine(db_url)
    with engine.connect() as conn:
        reveals = conn.execute(
            select(DeskEvent.actor, DeskEvent.item_id).where(DeskEvent.event == "reveal")
        ).all()
    assert [tuple(r) for r in reveals] == [("alice", first)]

    # Approve with labels: tick concept 2 (gore), then `a`; the next item opens.
    page.keyboard.press("2")
    with page.expect_navigation():
        page.keyboard.press("a")
    second = item_id(page)
    assert second != first
    # Reject: tick concept 1, `r`, type the reason, Enter.
    page.keyboard.press("1")
    page.keyboard.press("r")
    page.keyboard.type("shows nudity")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert item_id(page) not in (first, second)
    with engine.connect() as conn:
        rows = {
            r.id: r
            for r in conn.execute(
                select(ReviewItem.id, ReviewItem.status, ReviewItem.reason, ReviewItem.labels)
            )
        }
    assert rows[first].status == "approved" and rows[first].labels["explicit"]
    assert rows[second].status == "rejected" and rows[second].reason == "shows nudity"
    assert rows[second].labels["explicit"]
    assert problems == []
    context.close()


def test_two_reviewers_and_a_late_verdict(browser, desk, clock):
    base, data = desk
    alice_context, alice = log_in(browser, base, "alice")
    bob_context, bob = log_in(browser, base, "bob")
    for page in (alice, bob):
        page.fill("input[name=n]", "3")
        with page.expect_navigation():
            page.click("#claim-form button")
    alice_items, bob_items = claims_of(alice), claims_of(bob)
    assert len(alice_items) == 3 and len(bob_items) == 3
    assert not alice_items & bob_items
    assert not (alice_items | bob_items) & set(data.special)

    mine = min(alice_items)
    alice.goto(f"/items/{mine}")
    clock.advance(LEASE + 1)  # alice's leases run out while her page is open
    with alice.expect_navigation():
        alice.keyboard.press("a")
    assert "lease expired" in alice.inner_text("#error")
    alice_context.close()
    bob_context.close()


def test_special_care_csrf_and_no_session(browser, desk):
    base, data = desk
    context, page = log_in(browser, base, "alice")
    special = data.special[0]
    response = page.goto(f"/items/{special}")
    assert response.status == 404 and data.decision_of[special] not in page.content()
    page.goto("/decisions")
    page.fill("input[name=id]", data.decision_of[special])
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert "no such decision" in page.inner_text("#error")
    assert page.request.get(f"/items/{special}/image").status == 404

    # A form posted without its CSRF token is refused.
    page.goto("/")
    page.eval_on_selector("#claim-form input[name=csrf]", "e => e.remove()")
    with page.expect_navigation():
        page.click("#claim-form button")
    assert "CSRF" in page.inner_text("#error")
    page.goto("/")
    assert page.query_selector(".claims") is None, "the refused claim took items"
    context.close()

    anonymous = browser.new_context(base_url=base)
    for url in ("/", f"/items/{data.ordinary[0]}", "/audit", "/stats"):
        response = anonymous.request.get(url, max_redirects=0)
        assert response.status == 303 and response.body() == b""
    image = anonymous.request.get(f"/items/{data.ordinary[0]}/image", max_redirects=0)
    assert image.status == 401 and image.body() == b""
    anonymous.close()


@pytest.mark.slow
def test_two_hundred_items_with_the_keyboard_alone(browser, tmp_path, clock):
    db_url = sqlite_url(tmp_path)  # one backend is enough for the keyboard marathon
    seed_desk(db_url, tmp_path / "held", ordinary=200)
    add_users(db_url, {"alice": "reviewer"})
    settings = DeskSettings(
        db_url=db_url, held_dir=tmp_path / "held", lease_seconds=3600, now=clock, webhooks=False
    )
    with serving(create_app(settings)) as base:
        context, page = log_in(browser, base, "alice")
        with page.expect_navigation():
            page.keyboard.press("n")
        for i in range(200):
            key = "a" if i % 2 == 0 else "r"
            if key == "a":
                with page.expect_navigation():
                    page.keyboard.press("a")
            else:
                page.keyboard.press("r")
                page.keyboard.type("x")
                with page.expect_navigation():
                    page.keyboard.press("Enter")
        assert page.url == base + "/?note=empty"
        context.close()
    with get_engine(db_url).connect() as conn:
        statuses = [r.status for r in conn.execute(select(ReviewItem.status))]
    assert statuses.count("approved") == 100 and statuses.count("rejected") == 100
