"""`moderation check` says where its decisions went: logged (password masked), spooled, replayed,
or not recorded at all (exit 1, no success line). Issue 7 and issue 8 items 11 and 12."""

from __future__ import annotations

import errno
import json
import os

import pytest
from click.testing import CliRunner

from moderation.cli import main
from moderation.demo import sample_images
from moderation.storage import db as storage_db
from moderation.storage import spool as spool_module
from moderation.storage import upgrade
from tests.pg import temporary_pg_database

DOWN_PG = "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/x"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    sample_images(folder, n=2)
    return folder


@pytest.fixture
def policy(tmp_path, tiny_clip_dir):
    path = tmp_path / "policy.yaml"
    path.write_text(
        f"policy: rec\nmodel: {tiny_clip_dir}\nconcepts:\n"
        "  - name: any\n    prompts: [a photo]\n    threshold: -1\n    action: blackout\n"
    )
    return path


@pytest.fixture
def spool(tmp_path, monkeypatch):
    folder = tmp_path / "spool"
    monkeypatch.setenv("MODERATION_SPOOL_DIR", str(folder))
    monkeypatch.setenv("MODERATION_HELD_DIR", str(tmp_path / "held"))
    return folder


def check(photos, policy, *args, code=0):
    result = CliRunner().invoke(
        main, ["check", str(photos), "--policy", str(policy), *map(str, args)]
    )
    assert result.exit_code == code, result.output
    return result


def summary(result) -> str:
    return result.stdout.splitlines()[-1]


def test_a_spooled_run_says_so_and_never_shows_the_password(photos, policy, spool):
    result = check(photos, policy, "--db", DOWN_PG)
    assert summary(result) == (
        f"2 images: 2 flag; spooled 2 decisions to {spool} (database unreachable)"
    )
    assert "s3cret" not in result.output


def test_the_next_run_says_how_many_it_replayed(tmp_path, photos, policy, spool):
    later = tmp_path / "later"
    url = f"sqlite:///{later / 'm.db'}"
    first = check(photos, policy, "--db", url)
    assert (
        summary(first) == f"2 images: 2 flag; spooled 2 decisions to {spool} (database unreachable)"
    )
    later.mkdir()
    second = check(photos, policy, "--db", url)
    assert summary(second) == (
        f"2 images: 2 flag; logged to {url}; replayed 2 earlier spooled decisions into {url}"
    )
    storage_db.dispose(url)


@pytest.mark.postgres
def test_a_logged_run_masks_the_password(photos, policy, spool, pg_server):
    with temporary_pg_database(pg_server, prefix="moderation_check") as url:
        upgrade(url)
        with_password = url.replace("postgres@", "postgres:s3cret@")  # trust auth ignores it
        result = check(photos, policy, "--db", with_password)
        assert summary(result) == (
            f"2 images: 2 flag; logged to {with_password.replace('s3cret', '***')}"
        )
        assert "s3cret" not in result.output
        storage_db.dispose(with_password)


def test_decisions_recorded_nowhere_fail_the_run_naming_them(photos, policy, spool, monkeypatch):
    real = os.write

    def full_disk(fd, data):
        if b'"rows"' in bytes(data):  # the policy is spooled; then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(spool_module.os, "write", full_disk)
    result = check(photos, policy, "--db", DOWN_PG, "--json", code=1)
    rows = json.loads(result.stdout)
    ids = [row["decision_id"] for row in rows]
    assert [row["recorded"] for row in rows] == [False, False]
    assert [row["action"] for row in rows] == ["blackout", "blackout"]  # still moderated
    (path,) = spool.glob("*.spool")
    assert result.stderr.splitlines()[-1] == (
        f"Error: 2 of 2 decisions were not recorded (cannot reach database "
        "postgresql+psycopg://postgres:***@127.0.0.1:1/x: connection failed: connection to "
        'server at "127.0.0.1", port 1 failed: Connection refused, and the spool cannot take '
        f"them: cannot write to the spool file {path}: [Errno 28] No space left on device): "
        f"{', '.join(ids)}"
    )
    text = check(photos, policy, "--db", DOWN_PG, code=1)
    assert "spooled" not in text.stdout and "logged" not in text.stdout
    assert summary(text) == "2 images: 2 flag"
    assert "s3cret" not in text.output


def test_recorded_is_true_when_logged(tmp_path, photos, policy, spool):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    rows = json.loads(check(photos, policy, "--db", url, "--json").stdout)
    assert [row["recorded"] for row in rows] == [True, True]
    rows = json.loads(check(photos, policy, "--no-log", "--json").stdout)
    assert [row["recorded"] for row in rows] == [False, False]
    storage_db.dispose(url)
