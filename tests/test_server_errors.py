"""`moderation serve` answers bad input in OpenAI's error shape and stays up: 400, 401, 413,
422, 429; bombs, truncated and empty images are logged `error` decisions; remote URLs are
refused unless allowed; what clients send reaches the log escaped (issue 17)."""

from __future__ import annotations

import logging
import threading
import time

import httpx
import pytest

from moderation.decisions.browser import DecisionBrowser
from moderation.engine import Moderator
from moderation.server.config import is_loopback
from moderation.storage import db as storage_db
from tests.server_factory import bomb_png, data_url, running, sample_pngs, split_policy


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return sample_pngs(tmp_path_factory.mktemp("err-images"), n=3)


@pytest.fixture(scope="module")
def policy(tmp_path_factory, tiny_clip_dir, images):
    return split_policy(tmp_path_factory.mktemp("err-policy"), tiny_clip_dir, images)


@pytest.fixture(scope="module")
def server(tmp_path_factory, policy):
    folder = tmp_path_factory.mktemp("err-served")
    url = f"sqlite:///{folder / 'm.db'}"
    with running(policy, url, folder, max_body_mb=1, fetch_urls=frozenset({"images.example"})) as (
        srv,
        key,
    ):
        yield srv, {"Authorization": f"Bearer {key}"}, url
    storage_db.dispose(url)


def shape(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        (
            {"input": [part("data:image/png;base64,@@@")]},
            "invalid_base64",
            "input[0].image_url.url",
        ),
        ({"input": [part("data:text/plain;base64,aGk=")]}, "unsupported_media_type", None),
        ({"input": [part("not a url")]}, "invalid_image_url", None),
        ({"input": [{"type": "audio", "audio": "x"}]}, "unsupported_input_type", "input[0].type"),
        ({"input": "only text"}, "no_image_input", "input"),
        ({"input": [part("https://evil.example/x.png")]}, "image_url_not_allowed", None),
        ({"input": [part("http://127.0.0.1:1/x.png")]}, "image_url_not_allowed", None),
    ],
)
def test_bad_input_is_a_400_in_openai_shape(server, body, code, param):
    srv, headers, _ = server
    error = shape(httpx.post(f"{srv.url}/v1/moderations", json=body, headers=headers), 400, code)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/moderations", {"input": 5}),
        ("/v1/moderations", {"model": "x"}),
        ("/v1/moderate", {"images": []}),
        ("/v1/moderate", {"images": ["AAAA"], "unknown": 1}),
        ("/v1/moderate", {"images": ["AAAA"], "top": -1}),
    ],
)
def test_schema_errors_are_422(server, path, body):
    srv, headers, _ = server
    error = shape(httpx.post(f"{srv.url}{path}", json=body, headers=headers), 422)
    assert error["param"]


def test_bodies_over_the_limit_are_413_with_or_without_a_length(server):
    srv, headers, _ = server
    big = {"input": [part("data:image/png;base64," + "A" * 1_200_000)]}
    shape(
        httpx.post(f"{srv.url}/v1/moderations", json=big, headers=headers), 413, "request_too_large"
    )

    def chunks():
        yield b'{"images": ["'
        for _ in range(200):
            yield b"A" * 10_000
        yield b'"]}'

    r = httpx.post(
        f"{srv.url}/v1/moderate",
        content=chunks(),
        headers={**headers, "Content-Type": "application/json"},
    )
    shape(r, 413, "request_too_large")
    assert httpx.get(f"{srv.url}/healthz").status_code == 200


def test_bomb_truncated_and_empty_images_get_logged_error_decisions(server, images):
    srv, headers, url = server
    png = images[0].read_bytes()
    bad = {"bomb": bomb_png(), "truncated": png[: len(png) // 2], "empty": b"", "garbage": b"xyz"}
    body = {"images": [data_url(b) for b in bad.values()], "metadata": {"prompt": "p"}}
    r = httpx.post(f"{srv.url}/v1/moderate", json=body, headers=headers)
    assert r.status_code == 200, r.text
    decisions = [x["decision"] for x in r.json()["results"]]
    assert [d["verdict"] for d in decisions] == ["error"] * 4
    assert all(d["action"] == "blackout" and d["recorded"] for d in decisions)
    assert "too large" in decisions[0]["error"] and "truncated" in decisions[1]["error"]
    assert "empty image" in decisions[2]["error"]
    browser = DecisionBrowser(url)
    for d in decisions:
        logged = browser.show(d["decision_id"])
        assert logged["verdict"] == "error" and logged["action"] == "blackout"
    # OpenAI's endpoint answers 400, and the image's error decision is logged all the same.
    r = httpx.post(
        f"{srv.url}/v1/moderations",
        json={"input": [part(data_url(bad["truncated"]))]},
        headers=headers,
    )
    error = shape(r, 400, "image_undecodable")
    decision_id = error["message"].split("logged as decision ")[1].split(",")[0]
    assert browser.show(decision_id)["verdict"] == "error"
    assert httpx.get(f"{srv.url}/healthz").status_code == 200


def test_multipart_uploads(server, images):
    srv, headers, _ = server
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in images[:2]]
    r = httpx.post(
        f"{srv.url}/v1/moderate",
        files=files,
        data={"metadata": '{"prompt": "x"}', "return_images": "true"},
        headers=headers,
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2 and all(x["image"].startswith("data:image/png") for x in results)
    assert results[0]["decision"]["metadata"]["prompt"] == "x"


def test_client_text_reaches_the_log_escaped(server, caplog):
    srv, headers, _ = server
    with caplog.at_level(logging.INFO, logger="moderation.server"):
        r = httpx.get(f"{srv.url}/v1/decisions/%1b%5b31mred%0aforged", headers=headers)
        shape(r, 404, "decision_not_found")
        time.sleep(0.1)
    text = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "\\x1b[31mred\\nforged" in text
    assert "\x1b" not in text and "red\nforged" not in text
    assert "\x1b" not in r.text


def test_over_the_queue_limit_is_429_with_retry_after(tmp_path, policy, images):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    moderator = Moderator.from_policy(
        policy, db=url, spool_dir=tmp_path / "s", held_dir=tmp_path / "h"
    )
    real = moderator.moderate
    gate = threading.Event()

    def slow(*args, **kwargs):  # the engine is busy until the test lets it go
        gate.wait(10)
        return real(*args, **kwargs)

    moderator.moderate = slow
    with running(policy, url, tmp_path, moderator=moderator, max_batch=1, queue_limit=2) as (
        srv,
        key,
    ):
        headers = {"Authorization": f"Bearer {key}"}
        body = {"input": [part(data_url(images[0].read_bytes()))]}
        answers = []

        def call():
            answers.append(
                httpx.post(f"{srv.url}/v1/moderations", json=body, headers=headers, timeout=30)
            )

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
            time.sleep(0.15)
        gate.set()
        for t in threads:
            t.join()
    codes = sorted(r.status_code for r in answers)
    assert codes.count(200) >= 3 and codes.count(429) >= 1, codes
    refused = next(r for r in answers if r.status_code == 429)
    assert shape(refused, 429, "queue_full")["type"] == "rate_limit_error"
    assert int(refused.headers["Retry-After"]) >= 1
    storage_db.dispose(url)


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
    ],
)
def test_no_auth_is_for_loopback_only(host, ok):
    assert is_loopback(host) is ok


def test_serve_refuses_no_auth_on_a_public_address(policy):
    from click.testing import CliRunner

    from moderation.cli import main

    result = CliRunner().invoke(
        main, ["serve", "--policy", str(policy), "--no-auth", "--host", "0.0.0.0"]
    )
    assert result.exit_code == 2
    assert "--no-auth listens on loopback addresses only" in result.output


@pytest.fixture
def image_host(images):
    """A plain HTTP server on 127.0.0.1 serving an image and redirects."""
    import http.server

    png = images[0].read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            port = self.server.server_address[1]
            if self.path == "/img.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)
                return
            target = {
                "/here": "/img.png",
                "/away": f"http://localhost:{port}/img.png",
            }.get(self.path)
            self.send_response(302 if target else 404)
            if target:
                self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_fetch_urls_allows_listed_hosts_only(tmp_path, policy, image_host, monkeypatch):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    with running(policy, url, tmp_path, fetch_urls=frozenset({"127.0.0.1"})) as (srv, key):
        headers = {"Authorization": f"Bearer {key}"}

        def ask(path):
            body = {"input": [part(f"{image_host}{path}")]}
            return httpx.post(f"{srv.url}/v1/moderations", json=body, headers=headers)

        assert ask("/img.png").status_code == 200
        assert ask("/here").status_code == 200  # a redirect to the same (allowed) host
        shape(ask("/away"), 400, "image_url_not_allowed")  # to a host not listed
        shape(ask("/missing"), 400, "image_fetch_failed")
        from moderation.server import inputs

        monkeypatch.setattr(inputs, "FETCH_MAX_BYTES", 100)
        shape(ask("/img.png"), 400, "image_too_large")
    storage_db.dispose(url)
