"""The review desk over HTTP (no browser): every route's authorization (walking the route
table), CSRF, special-care visibility, images, sessions, throttling, escaping, leases."""

from __future__ import annotations

import hashlib
import html
import io
import json
import re
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select
from starlette.routing import Mount

from moderation.decisions.document import review_item_document
from moderation.desk.app import route_table
from moderation.desk.routes_auth import PUBLIC
from moderation.desk.web import CSP, TEMPLATES
from moderation.storage.models import DeskEvent, ReviewItem
from moderation.storage.schema import get_engine
from tests.desk_app import (  # noqa: F401  (fixtures)
    LEASE,
    app,
    cheap_passwords,
    clock,
    csrf,
    login,
    seeded,
)
from tests.desk_factory import csrf_of

SAMPLE = {"item_id": "1", "decision_id": "00000000-0000-4000-8000-000000000000"}


def _path(path: str, data) -> str:
    values = {**SAMPLE, "item_id": str(data.ordinary[0])}
    for key, value in values.items():
        path = path.replace("{" + key + "}", value)
    return path


def _access(route) -> set:
    return {getattr(d.call, "desk_access", None) for d in route.dependant.dependencies} - {None}


def _csrf(route) -> bool:
    return any(getattr(d.call, "desk_csrf", False) for d in route.dependant.dependencies)


def test_every_route_declares_who_may_use_it(app):
    table = route_table(app)
    assert len(table) >= 15
    for method, path, route in table:
        if (method, path) in PUBLIC:
            assert not _access(route)
            continue
        assert _access(route), f"{method} {path} has no authorization dependency"
        if method != "GET":
            assert _csrf(route), f"{method} {path} changes state without a CSRF check"
    assert PUBLIC == {("GET", "/login"), ("POST", "/login")}
    # Besides the routes, only the static CSS and JS are mounted (public, nothing sensitive).
    mounts = [r for r in app.routes if isinstance(r, Mount)]
    assert [m.path for m in mounts] == ["/static"]
    assert sorted(p.name for p in Path(mounts[0].app.directory).iterdir()) == [
        "desk.css",
        "desk.js",
    ]


def test_unauthenticated_requests_get_no_content(app, seeded):
    client = TestClient(app, follow_redirects=False)
    for method, path, _route in route_table(app):
        if (method, path) in PUBLIC:
            continue
        url = _path(path, seeded)
        response = client.request(method, url, data={"csrf": "x", "verdict": "approve"})
        assert response.status_code in (303, 401), (method, url, response.status_code)
        assert response.content == b"", (method, url)
        if response.status_code == 303:
            assert response.headers["location"] == "/login"
    # The image of a real item, too.
    response = client.get(f"/items/{seeded.ordinary[0]}/image")
    assert response.status_code == 401 and response.content == b""


def test_reviewers_cannot_use_admin_routes(app, seeded):
    alice = login(app, "alice")
    for method, path, route in route_table(app):
        if "admin" in _access(route):
            response = alice.request(method, _path(path, seeded))
            assert response.status_code == 403, path
            assert 'id="audit"' not in response.text and "login" not in response.text
    root = login(app, "root")
    assert root.get("/audit").status_code == 200
    export = root.get("/audit/export?format=csv")
    assert export.status_code == 200 and export.text.startswith("source,id,at,actor,event")
    assert "login" in export.text
    lines = root.get("/audit/export?format=jsonl&actor=alice&event=login").text.splitlines()
    assert [(json.loads(x)["actor"], json.loads(x)["event"]) for x in lines] == [("alice", "login")]
    assert root.get("/audit?since=yesterday").status_code == 400
    assert root.get("/audit?item=99999999999999").status_code == 400
    one_item = root.get(f"/audit?item={seeded.ordinary[0]}").text
    assert "<td>created</td>" in one_item and "<td>login</td>" not in one_item


def test_security_headers_and_cookie(app):
    client = TestClient(app, follow_redirects=False)
    page = client.get("/login")
    assert page.headers["content-security-policy"] == CSP
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"
    assert "<script>" not in page.text and " on" + "click=" not in page.text
    response = client.post(
        "/login",
        data={"name": "alice", "password": "correct horse battery", "csrf": csrf_of(page.text)},
    )
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie


def test_secure_cookie_behind_tls(app):
    client = TestClient(app, base_url="https://desk.example", follow_redirects=False)
    page = client.get("/login")
    response = client.post(
        "/login",
        data={"name": "alice", "password": "correct horse battery", "csrf": csrf_of(page.text)},
    )
    assert "secure" in response.headers["set-cookie"].lower()


def test_forms_without_csrf_token_are_refused(app, seeded, db_url):
    alice = login(app, "alice")
    assert alice.post("/claim", data={"n": "2"}).status_code == 403
    assert alice.post("/claim", data={"n": "2", "csrf": "wrong"}).status_code == 403
    with get_engine(db_url).connect() as conn:
        statuses = set(conn.execute(select(ReviewItem.status)).scalars())
    assert statuses == {"pending"}, "a refused form changed the queue"
    # Login itself carries a token too (double submit).
    client = TestClient(app, follow_redirects=False)
    response = client.post("/login", data={"name": "alice", "password": "correct horse battery"})
    assert response.status_code == 403 and "desk_session" not in response.headers.get(
        "set-cookie", ""
    )


def test_special_care_items_are_invisible_to_reviewers(app, seeded):
    alice = login(app, "alice")
    special = seeded.special[0]
    token = csrf(alice)
    for response in (
        alice.get(f"/items/{special}"),
        alice.get(f"/items/{special}/image"),
        alice.get(f"/decisions/{seeded.decision_of[special]}"),
        alice.get(f"/decisions?id={seeded.decision_of[special]}"),
        alice.post(f"/items/{special}/reveal", data={"csrf": token}),
        alice.post(
            f"/items/{special}/verdict", data={"csrf": token, "verdict": "approve", "token": "t"}
        ),
    ):
        assert response.status_code == 404
        assert seeded.decision_of[special] not in response.text
    queue = alice.get("/?status=").text
    assert all(f'data-item="{i}"' not in queue for i in seeded.special)
    assert all(f'data-item="{i}"' in queue for i in seeded.ordinary)
    # Claiming everything never hands alice a special-care item.
    response = alice.post("/claim", data={"n": "50", "csrf": token})
    assert response.status_code == 303
    mine = alice.get("/").text
    assert all(f'href="/items/{i}"' not in mine for i in seeded.special)
    carol = login(app, "carol")
    assert carol.get(f"/items/{special}").status_code == 200
    assert carol.get(f"/decisions/{seeded.decision_of[special]}").status_code == 200


def test_image_is_blurred_until_revealed_and_checked(app, seeded, db_url, tmp_path):
    alice = login(app, "alice")
    item = seeded.ordinary[0]
    original = seeded.image_of[item]
    before = alice.get(f"/items/{item}/image")
    assert before.status_code == 200 and before.headers["cache-control"] == "no-store"
    assert before.content != original
    image = Image.open(io.BytesIO(before.content))
    assert image.mode == "L"  # greyscale
    alice.post(f"/items/{item}/reveal", data={"csrf": csrf(alice)})
    after = alice.get(f"/items/{item}/image")
    assert after.content == original
    with get_engine(db_url).connect() as conn:
        events = conn.execute(
            select(DeskEvent.actor, DeskEvent.event, DeskEvent.item_id).where(
                DeskEvent.event == "reveal"
            )
        ).all()
    assert [tuple(e) for e in events] == [("alice", "reveal", item)]
    # Another reviewer still gets the blurred rendition.
    bob = login(app, "bob")
    assert bob.get(f"/items/{item}/image").content == before.content
    # A held file that no longer matches its sha256 is not served at all.
    sha = hashlib.sha256(original).hexdigest()
    path = tmp_path / "held" / sha[:2] / f"{sha}.png"
    path.chmod(0o600)
    path.write_bytes(original + b"tampered")
    assert alice.get(f"/items/{item}/image").status_code == 404


def test_image_mode_preference_keeps_images_blurred(app, seeded, db_url):
    alice = login(app, "alice")
    item = seeded.ordinary[0]
    grey = alice.get(f"/items/{item}/image").content
    assert (
        alice.post("/account", data={"csrf": csrf(alice), "image_mode": "blur"}).status_code == 303
    )
    colour = alice.get(f"/items/{item}/image").content
    assert colour not in (grey, seeded.image_of[item])
    assert Image.open(io.BytesIO(colour)).mode == "RGB"
    refused = alice.post("/account", data={"csrf": csrf(alice), "image_mode": "clear"})
    assert refused.status_code == 400 and "unknown image mode" in refused.text
    assert 'value="blur" checked' in alice.get("/account").text
    with get_engine(db_url).connect() as conn:
        events = conn.execute(
            select(DeskEvent.details).where(DeskEvent.event == "preference_changed")
        ).all()
    assert [e.details for e in events] == [{"image_mode": "blur"}]


def test_login_is_throttled(app):
    client = TestClient(app, follow_redirects=False)
    for _ in range(5):
        page = client.get("/login")
        response = client.post(
            "/login",
            data={"name": "bob", "password": "wrong password!", "csrf": csrf_of(page.text)},
        )
        assert response.status_code == 401 and "wrong name or password" in response.text
    page = client.get("/login")
    response = client.post(
        "/login",
        data={"name": "bob", "password": "correct horse battery", "csrf": csrf_of(page.text)},
    )
    assert response.status_code == 401 and "too many failed logins" in response.text


def test_item_ids_out_of_range_are_refused(app):
    alice = login(app, "alice")
    for url in ("/items/0", "/items/2147483648", "/items/99999999999999999999/image"):
        assert alice.get(url).status_code == 422, url
    assert alice.get("/items/2147483647").status_code == 404


def test_user_text_is_escaped(app, seeded):
    alice = login(app, "alice")
    page = alice.get(f"/items/{seeded.ordinary[0]}").text
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page


def test_lease_renew_release_and_late_verdict(app, seeded, clock):
    alice = login(app, "alice")
    token = csrf(alice)
    first = alice.post("/claim", data={"n": "1", "csrf": token})
    item = int(first.headers["location"].split("/")[2].split("?")[0])
    page = alice.get(f"/items/{item}").text
    claim = page.split('name="token" value="')[1].split('"')[0]
    assert f'data-remaining="{LEASE}"' in page
    clock.advance(LEASE - 10)
    assert (
        alice.post(f"/items/{item}/renew", data={"csrf": token, "token": claim}).status_code == 303
    )
    assert f'data-remaining="{LEASE}"' in alice.get(f"/items/{item}").text
    clock.advance(LEASE + 1)  # expired: bob takes it over; alice's verdict comes too late
    bob = login(app, "bob")
    bob.post("/claim", data={"n": "1", "csrf": csrf(bob)})
    late = alice.post(
        f"/items/{item}/verdict",
        data={"csrf": token, "token": claim, "verdict": "approve"},
    )
    assert late.status_code == 409 and "claimed by bob" in late.text
    bob_page = bob.get(f"/items/{item}").text
    bob_claim = bob_page.split('name="token" value="')[1].split('"')[0]
    released = bob.post(f"/items/{item}/release", data={"csrf": csrf(bob), "token": bob_claim})
    assert released.status_code == 303
    assert 'id="status">pending' in bob.get(f"/items/{item}").text


def test_verdict_with_labels_and_next(app, seeded, db_url):
    alice = login(app, "alice")
    token = csrf(alice)
    item = int(
        alice.post("/claim", data={"n": "2", "csrf": token})
        .headers["location"]
        .split("/")[2]
        .split("?")[0]
    )
    claim = alice.get(f"/items/{item}").text.split('name="token" value="')[1].split('"')[0]
    response = alice.post(
        f"/items/{item}/verdict",
        data={
            "csrf": token,
            "token": claim,
            "verdict": "reject",
            "reason": "gore",
            "concept": ["gore"],
            "labels_explicit": "1",
        },
    )
    assert response.status_code == 303 and response.headers["location"] == "/next"
    nxt = alice.get("/next")
    assert nxt.status_code == 303 and nxt.headers["location"] != f"/items/{item}"
    with get_engine(db_url).connect() as conn:
        row = conn.execute(
            select(ReviewItem.status, ReviewItem.labels).where(ReviewItem.id == item)
        ).one()
    assert row.status == "rejected" and row.labels["shows"] == ["gore"] and row.labels["explicit"]
    # Stats and the decision page answer.
    assert "alice" in alice.get("/stats").text
    decision = alice.get(f"/decisions/{seeded.decision_of[item]}")
    assert decision.status_code == 200 and "rejected" in decision.text
    assert claim not in decision.text, "a claim token is its owner's credential"


ROW = re.compile(r'<tr[^>]*data-concept="([^"]*)">(.*?)</tr>', re.S)
CELL = re.compile(r"<td[^>]*>(.*?)</td>", re.S)


def _concept_rows(page: str) -> list[tuple[str, list[str]]]:
    table = page.split('id="concepts"', 1)[1].split("</table>", 1)[0]
    return [(name, [c.strip() for c in CELL.findall(row)]) for name, row in ROW.findall(table)]


def _fmt(value, form: str = "%.4f") -> str:
    return "-" if value is None else form % value


def _shows_document(page: str, doc: dict) -> None:
    """The parts of the decision document every decision-showing page carries."""
    rows = _concept_rows(page)
    assert [name for name, _ in rows] == [c["name"] for c in doc["concepts"]]
    scores = [c["score"] for c in doc["concepts"]]
    assert scores == sorted(scores, reverse=True), "nearest first"
    for (_, cells), c in zip(rows, doc["concepts"], strict=True):
        assert cells[2:6] == [
            _fmt(c["cosine"]),
            _fmt(c["threshold"]),
            _fmt(c["margin"], "%+.4f"),
            _fmt(c["score"], "%+.4f"),
        ]
        assert cells[6] == ("yes" if c["fired"] else "")
        assert cells[7] == ("yes" if c["in_review_band"] else "")
    assert html.escape(doc["action_reason"]["text"]) in page
    hits = ", ".join(doc["special_care"]["hits"]) or "none"
    assert f"Hits: {html.escape(hits)};" in page
    for c in doc["special_care"]["concepts"]:
        assert f"<td>{html.escape(c['name'])}</td>" in page
    policy = doc["policy"]
    assert f"{policy['name']} v{policy['version']} <code>{policy['digest']}</code>" in page
    assert f"(model {policy['model']})" in page
    band = ", ".join(doc["review_band"]["concepts"]) or "none"
    assert f"concepts within it: {band}." in page
    assert f"{doc['verdict']} / {doc['action']}" in page
    for key, value in doc["metadata"].items():
        assert f"<dt>{html.escape(key)}</dt><dd>{html.escape(str(value))}</dd>" in page
    assert "<b>x</b>" not in page


def test_pages_show_the_decision_document(app, seeded, db_url):
    carol = login(app, "carol")  # special care: sees every item
    with get_engine(db_url).connect() as conn:
        docs = {i: review_item_document(conn, i) for i in seeded.ordinary + seeded.special}
    for item, doc in docs.items():
        assert doc["decision_id"] == seeded.decision_of[item]
        page = carol.get(f"/items/{item}").text
        _shows_document(page, doc)
        assert f'<a href="/decisions/{doc["decision_id"]}">' in page
        history = page.split('id="history">', 1)[1].split("</ol>", 1)[0]
        assert [e["event"] for e in doc["events"]] == ["created"]
        assert f"{doc['events'][0]['at']} system: created" in history
        decision = carol.get(f"/decisions/{doc['decision_id']}").text
        _shows_document(decision, doc)
        assert f'<a href="/items/{item}">{item}</a>' in decision
    # The special-care items' pages name their hits.
    special = docs[seeded.special[0]]
    assert special["special_care"]["hits"]
    assert "Hits: none" not in carol.get(f"/items/{seeded.special[0]}").text
    # The labels to tick keep the policy's order (keys 1-9 mean the same concept on every item),
    # while the concepts table is nearest first.
    claimed = carol.post("/claim", data={"n": "1", "csrf": csrf(carol)}).headers["location"]
    item = int(claimed.split("/")[2].split("?")[0])
    labels = re.findall(r'name="concept" value="([^"]*)"', carol.get(f"/items/{item}").text)
    policy_order = sorted(docs[item]["concepts"], key=lambda c: c["index"])
    special_names = [c["name"] for c in docs[item]["special_care"]["concepts"]]
    assert labels == [c["name"] for c in policy_order] + special_names
    assert [c["index"] for c in policy_order] == list(range(len(policy_order)))
    # A unique suffix (or prefix) of a decision id finds its page; an unknown one does not.
    full = seeded.decision_of[seeded.ordinary[0]]
    found = carol.get(f"/decisions?id={full[-12:]}")
    assert found.status_code == 303 and found.headers["location"] == f"/decisions/{full}"
    for missing in ("/decisions?id=ffffffffffff", "/decisions/ffffffff-0000"):
        response = carol.get(missing)
        assert response.status_code == 404 and "no such decision" in response.text


def test_document_parts_render_views_and_nested_metadata():
    doc = {
        "concepts": [
            {
                "name": "gore",
                "category": None,
                "cosine": 0.31,
                "threshold": 0.3,
                "margin": 0.01,
                "score": 0.02,
                "fired": True,
                "in_review_band": False,
                "view": {"index": 2, "frame": 4, "box": [0, 8, 64, 72]},
            },
            {
                "name": "nudity",
                "category": "sexual",
                "cosine": None,
                "threshold": 0.25,
                "margin": None,
                "score": None,
                "fired": False,
                "in_review_band": False,
                "view": None,
            },
        ],
        "concepts_listed": 2,
        "concepts_total": 5,
        "metadata": {"prompt": "<script>", "tags": ["<i>", 1]},
    }
    show = TEMPLATES.get_template("document.html").module
    table = str(show.concepts(doc))
    rows = _concept_rows(table)
    assert rows[0][1][8] == "view 2, frame 4, box 0,8,64,72"
    assert rows[1][1][2:6] == ["-", "0.2500", "-", "-"] and rows[1][1][8] == "-"
    assert "The 2 nearest of 5 concepts." in table
    meta = str(show.metadata(doc))
    assert "<dd>&lt;script&gt;</dd>" in meta
    assert "<dd>[&#34;&lt;i&gt;&#34;, 1]</dd>" in meta and "<i>" not in meta
