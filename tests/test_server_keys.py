"""`moderation api-key create | list | revoke` and migration 0007 (api_keys), up and down on
SQLite and PostgreSQL with rows (issue 17)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import inspect, text

from moderation.cli import main
from moderation.server.keys import ActiveKeys
from moderation.storage import current, downgrade, head_revision, upgrade
from moderation.storage import db as storage_db
from tests.pg import BACKENDS, scratch_url

MIGRATION = Path(__file__).parents[1] / "migrations" / "versions" / "0007_api_keys.py"


def _migration():
    spec = importlib.util.spec_from_file_location("m0007", MIGRATION)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args, code=0):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, result.output
    return result


@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_are_created_once_listed_and_revoked(backend, tmp_path):
    with scratch_url(backend, tmp_path, "keys", migrate=True) as url:
        created = run("api-key", "create", "app-1", "--db", url)
        key = created.stdout.strip()
        assert key.startswith("mod_") and len(key) > 40
        with storage_db.engine_for(url).connect() as conn:
            stored = conn.execute(text("SELECT name, key_sha256, prefix FROM api_keys")).all()
        assert stored == [("app-1", hashlib.sha256(key.encode()).hexdigest(), key[:10])]
        assert key not in json.dumps([list(r) for r in stored])
        run("api-key", "create", "app-1", "--db", url, code=1)
        keys = ActiveKeys(url)
        keys.refresh(force=True)
        assert keys.name_of(key) == "app-1" and keys.name_of(key + "x") is None
        listed = json.loads(run("api-key", "list", "--json", "--db", url).stdout)
        assert [(k["name"], k["prefix"], k["revoked_at"]) for k in listed] == [
            ("app-1", key[:10], None)
        ]
        table = run("api-key", "list", "--db", url).stdout
        assert "app-1" in table and key not in table
        assert run("api-key", "revoke", "app-1", "--db", url).stdout == "revoked API key 'app-1'\n"
        keys.refresh(force=True)
        assert keys.name_of(key) is None
        assert json.loads(run("api-key", "list", "--json", "--db", url).stdout)[0]["revoked_at"]
        missing = run("api-key", "revoke", "nobody", "--db", url, code=1)
        assert "no key named 'nobody'" in missing.output


def test_key_names_are_checked(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    result = run("api-key", "create", "bad\x1bname", "--db", url, code=1)
    assert "\x1b" not in result.output and "printable" in result.output
    storage_db.dispose(url)


@pytest.mark.parametrize("backend", BACKENDS)
def test_migration_0007_up_and_down_with_rows(backend, tmp_path):
    migration = _migration()
    with scratch_url(backend, tmp_path, "mig7", migrate=True) as url:
        run("api-key", "create", "kept", "--db", url)
        downgrade(url, migration.down_revision)
        assert current(url) == migration.down_revision
        with storage_db.engine_for(url).connect() as conn:
            assert "api_keys" not in inspect(conn).get_table_names()
        upgrade(url, "head")
        assert current(url) == head_revision()
        run("api-key", "create", "again", "--db", url)
        listed = json.loads(run("api-key", "list", "--json", "--db", url).stdout)
        assert [k["name"] for k in listed] == ["again"]


@pytest.mark.slow
def test_the_serve_command_serves(tmp_path, tiny_clip_dir):
    """`moderation serve` as users start it: a key from the CLI, a request, the decision logged
    with the key's name, the client's text escaped in the server's log."""
    import os
    import subprocess
    import sys
    import time

    import httpx

    from moderation.server.run import free_port
    from tests.server_factory import data_url, sample_pngs

    policy = tmp_path / "p.yaml"
    policy.write_text(
        f"policy: cli\nmodel: {tiny_clip_dir}\nconcepts:\n  - name: a\n    prompts: [a photo]\n"
        "    threshold: 0.0\n    action: blur\n"
    )
    url = f"sqlite:///{tmp_path / 'm.db'}"
    run("db", "upgrade", "--db", url)  # as docs/serving.md starts: keys live in the database
    key = run("api-key", "create", "web", "--db", url).stdout.strip()
    port = free_port()
    env = {**os.environ, "MODERATION_SPOOL_DIR": str(tmp_path / "spool")}
    args = ["-m", "moderation", "serve", "--policy", str(policy), "--db", url, "--port", str(port)]
    server = subprocess.Popen(
        [sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.3)
        image = data_url(sample_pngs(tmp_path / "img", n=1)[0].read_bytes())
        headers = {"Authorization": f"Bearer {key}"}
        r = httpx.post(f"{base}/v1/moderate", json={"images": [image]}, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["decision"]["metadata"]["api_key"] == "web"
        assert httpx.get(f"{base}/v1/decisions/%1b%5b2J", headers=headers).status_code == 404
    finally:
        server.terminate()
        output = server.communicate(timeout=60)[0].decode()
    listed = json.loads(run("decisions", "list", "--user", "web", "--json", "--db", url).stdout)
    assert len(listed) == 1
    assert '"GET /v1/decisions/\\x1b[2J" 404' in output and "\x1b" not in output
