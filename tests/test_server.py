"""`moderation serve` (issue 17): the real server on a loopback port, called with httpx and with
the official `openai` client; answers agree with an in-process Moderator; keys; metrics."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx
import pytest
from openai import AuthenticationError, OpenAI
from sqlalchemy import text

from moderation.decisions.browser import DecisionBrowser
from moderation.engine import Moderator
from moderation.image_files import read_image
from moderation.server.keys import REFRESH_S, create_key, revoke_key
from moderation.server.scores import OPENAI_CATEGORIES, to_unit
from moderation.storage import db as storage_db
from tests.pg import BACKENDS, scratch_url
from tests.server_factory import data_url, running, sample_pngs, split_policy


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return sample_pngs(tmp_path_factory.mktemp("served-images"))


@pytest.fixture(scope="module")
def policy(tmp_path_factory, tiny_clip_dir, images):
    return split_policy(tmp_path_factory.mktemp("served-policy"), tiny_clip_dir, images)


@pytest.fixture(scope="module")
def expected(policy, images):
    """What an in-process Moderator decides about each sample image."""
    with Moderator.from_policy(policy) as m:
        return m.moderate([read_image(p) for p in images]).decisions


@pytest.fixture(scope="module")
def server(tmp_path_factory, policy):
    folder = tmp_path_factory.mktemp("served")
    url = f"sqlite:///{folder / 'm.db'}"
    with running(policy, url, folder, max_wait_ms=5) as (srv, key):
        yield srv, key, url
    storage_db.dispose(url)


def image_part(path) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(path.read_bytes())}}


def test_openai_client_parses_and_agrees_with_the_moderator(server, images, expected, policy):
    srv, key, _ = server
    client = OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0)
    assert any(d.action != "allow" for d in expected)
    assert any(d.action == "allow" for d in expected)
    for path, want in zip(images, expected, strict=True):
        res = client.moderations.create(model="omni-moderation-latest", input=[image_part(path)])
        result = res.results[0]
        assert res.model == "served"
        assert result.flagged == (want.action != "allow")
        fired = {
            c
            for n, c in zip(want.policy.concept_names, want.policy.categories, strict=True)
            if n in want.fired
        }
        assert result.categories.sexual == ("sexual" in fired)
        assert result.categories.violence == ("violence" in fired)
        assert result.categories.hate is False and result.category_scores.hate == 0.0
        raw = result.model_dump(by_alias=True)
        assert raw["categories"]["weapons"] == ("weapons" in fired)  # the policy's own category
        nude = list(want.policy.concept_names).index("nude")
        assert result.category_scores.sexual == pytest.approx(
            to_unit(float(want.scores[nude])), rel=1e-3, abs=1e-5
        )  # batches of other sizes move the last float32 digits
        assert (result.category_scores.sexual > 0.5) == ("sexual" in fired)
        assert result.category_applied_input_types.sexual == ["image"]
        assert set(OPENAI_CATEGORIES) <= set(raw["categories"])


def test_one_result_for_several_images_flagged_if_any_is(server, images, expected):
    srv, key, _ = server
    flagged = [p for p, d in zip(images, expected, strict=True) if d.action != "allow"]
    clean = [p for p, d in zip(images, expected, strict=True) if d.action == "allow"]
    client = OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0)
    parts = [{"type": "text", "text": "ignored"}, image_part(clean[0]), image_part(flagged[0])]
    res = client.moderations.create(input=parts)
    assert len(res.results) == 1 and res.results[0].flagged is True
    res = client.moderations.create(input=[image_part(clean[0])])
    assert res.results[0].flagged is False


def test_moderate_returns_the_check_json_decisions_and_images(server, images, expected):
    srv, key, url = server
    body = {
        "images": [data_url(images[0].read_bytes()), data_url(images[1].read_bytes())[22:]],
        "metadata": {"prompt": "a beach", "seed": 7, "user": "u1", "app": "x"},
        "return_images": True,
        "top": 0,
    }
    r = httpx.post(f"{srv.url}/v1/moderate", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == [0, 1]
    for x, want in zip(results, expected[:2], strict=True):
        d = x["decision"]
        assert (d["verdict"], d["action"], d["fired"]) == (
            want.verdict,
            want.action,
            list(want.fired),
        )
        assert d["recorded"] is True and d["concepts_total"] == 3 and len(d["concepts"]) == 3
        assert d["metadata"]["user"] == "u1" and d["metadata"]["api_key"] == "app-1"
        assert x["image"].startswith("data:image/png;base64,")
    shown = httpx.get(
        f"{srv.url}/v1/decisions/{results[0]['decision']['decision_id']}",
        headers={"Authorization": f"Bearer {key}"},
    ).json()
    assert shown == DecisionBrowser(url).show(results[0]["decision"]["decision_id"])


def test_keys_are_required_and_revoked_keys_refused(server, images):
    srv, key, url = server
    client = OpenAI(base_url=f"{srv.url}/v1", api_key="mod_wrong", max_retries=0)
    with pytest.raises(AuthenticationError):
        client.moderations.create(input=[image_part(images[0])])
    for headers in ({}, {"Authorization": "Bearer mod_wrong"}, {"Authorization": key}):
        r = httpx.post(f"{srv.url}/v1/moderations", json={"input": "x"}, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    other = create_key(url, "to-revoke")
    ok = {"Authorization": f"Bearer {other}"}
    body = {"input": [image_part(images[0])]}
    # The service re-reads the keys every REFRESH_S seconds: a new key works, a revoked key
    # is refused, without a restart.
    assert _status_within(srv, body, ok, 200) == 200
    revoke_key(url, "to-revoke")
    assert _status_within(srv, body, ok, 401) == 401
    r = httpx.post(f"{srv.url}/v1/moderations", json=body, headers=ok)
    assert r.json()["error"]["message"] == "invalid or revoked API key"


def _status_within(srv, body, headers, wanted: int) -> int:
    deadline = time.monotonic() + 3 * REFRESH_S + 2
    while True:
        status = httpx.post(f"{srv.url}/v1/moderations", json=body, headers=headers).status_code
        if status == wanted or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def test_health_ready_metrics_and_openapi(server):
    srv, _, _ = server
    assert httpx.get(f"{srv.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{srv.url}/readyz").json()
    assert ready["ready"] is True and ready["database"] == "reachable"
    metrics = httpx.get(f"{srv.url}/metrics").text
    for name in (
        "moderation_requests_total",
        "moderation_images_total",
        "moderation_decisions_total",
        "moderation_batch_size_bucket",
        "moderation_queue_images",
        "moderation_request_seconds_bucket",
        "moderation_unrecorded_decisions_total",
    ):
        assert name in metrics
    paths = httpx.get(f"{srv.url}/openapi.json").json()["paths"]
    assert {"/v1/moderations", "/v1/moderate", "/v1/decisions/{decision_id}"} <= set(paths)


def _metric(text_: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text_, re.M)
    return float(match.group(1)) if match else 0.0


def test_concurrent_requests_are_coalesced(tmp_path, policy, images):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    with running(policy, url, tmp_path, max_batch=16, max_wait_ms=400) as (srv, key):
        headers = {"Authorization": f"Bearer {key}"}

        async def burst():
            async with httpx.AsyncClient(timeout=60) as client:
                body = {"input": [image_part(images[0])]}
                calls = [
                    client.post(f"{srv.url}/v1/moderations", json=body, headers=headers)
                    for _ in range(16)
                ]
                return await asyncio.gather(*calls)

        answers = asyncio.run(burst())
        assert [r.status_code for r in answers] == [200] * 16
        metrics = httpx.get(f"{srv.url}/metrics").text
    batches = _metric(metrics, "moderation_batch_size_count")
    assert _metric(metrics, "moderation_batch_size_sum") == 16
    assert 1 <= batches <= 4  # 16 requests in a few engine batches, not 16
    storage_db.dispose(url)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decisions_are_logged_with_the_keys_name(backend, tmp_path, policy, images):
    with scratch_url(backend, tmp_path, "served", migrate=True) as url:
        with running(policy, url, tmp_path) as (srv, key):
            client = OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0)
            for path in images[:3]:
                client.moderations.create(input=[image_part(path)])
        listed = DecisionBrowser(url).list(user="app-1", limit=100)
        assert len(listed) == 3
        with storage_db.engine_for(url).connect() as conn:
            metas = [m for (m,) in conn.execute(text("SELECT meta FROM decisions"))]
        metas = [storage_db_json(m) for m in metas]
        assert all(m["api_key"] == "app-1" and m["endpoint"] == "/v1/moderations" for m in metas)


def storage_db_json(value):
    import json

    return json.loads(value) if isinstance(value, str) else value


def test_a_request_whose_client_left_is_still_judged_and_logged(tmp_path, policy, images):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    moderator = Moderator.from_policy(
        policy, db=url, spool_dir=tmp_path / "s", held_dir=tmp_path / "h"
    )
    real, gate = moderator.moderate, threading.Event()

    def held(*args, **kwargs):  # the batch is taken; the engine waits until the client left
        gate.wait(10)
        return real(*args, **kwargs)

    moderator.moderate = held
    with running(policy, url, tmp_path, moderator=moderator) as (srv, key):
        body = {"input": [image_part(images[0])]}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(
                f"{srv.url}/v1/moderations",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
                timeout=0.5,
            )
        gate.set()
        deadline = time.monotonic() + 10
        while not DecisionBrowser(url).list(user="app-1") and time.monotonic() < deadline:
            time.sleep(0.1)
    logged = DecisionBrowser(url).list(user="app-1")
    assert len(logged) == 1 and logged[0]["verdict"] != "error"
    storage_db.dispose(url)


def test_no_auth_and_a_database_that_is_down_spool_and_say_so(tmp_path, policy, images):
    down = "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/x"
    with running(policy, down, tmp_path, auth=False) as (srv, _):
        ready = httpx.get(f"{srv.url}/readyz").json()
        assert ready["database"] == "spooling"
        body = {"images": [data_url(images[0].read_bytes())]}
        r = httpx.post(f"{srv.url}/v1/moderate", json=body)  # no key needed under --no-auth
        assert r.status_code == 200, r.text
        decision = r.json()["results"][0]["decision"]
        assert decision["recorded"] is True  # in the spool: recorded, and replayed later
        assert "api_key" not in decision["metadata"]
    assert list((tmp_path / "spool").iterdir())
