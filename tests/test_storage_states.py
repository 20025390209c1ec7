"""Transient server states keep decisions in the spool, never in quarantine (issue 15 item 4);
configuration errors fail at once and spool nothing (issue 19 item 5); a replay that leaves
decisions in quarantine says so and exits 1; `db status` counts the spool and the quarantine."""

from __future__ import annotations

import contextlib
import json
import secrets

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, make_url, select, text

from moderation.bench.records import example_decisions, example_policy
from moderation.cli import main
from moderation.storage import DecisionLog, DecisionRow, upgrade
from moderation.storage import db as storage_db
from moderation.storage.errors import (
    DatabaseConfigurationError,
    DatabaseUnavailableError,
    StorageError,
    UnrecordedError,
    classify,
)
from moderation.storage.spool_status import count_folder, count_quarantine
from tests.pg import pg_database_later, pg_test_url, temporary_pg_database


@pytest.fixture
def pg_server():
    server = pg_test_url()
    if server is None:
        pytest.skip("MODERATION_TEST_PG_URL is not set")
    return server


def run(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def stored_ids(url: str) -> set[str]:
    with storage_db.engine_for(url).connect() as conn:
        return set(conn.execute(select(DecisionRow.id)).scalars())


def set_read_only(url: str, on: bool) -> None:
    """`ALTER DATABASE ... SET default_transaction_read_only` (what a failover to a standby
    looks like to a client); the pooled sessions are dropped so that new ones see it."""
    parsed = make_url(url)
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(
                text(
                    f'ALTER DATABASE "{parsed.database}" SET default_transaction_read_only = '
                    + ("on" if on else "off")
                )
            )
    finally:
        admin.dispose()
    storage_db.dispose(url)


# -- item 4: a read-only database is an outage, not a refusal --------------------------------


@pytest.mark.postgres
def test_a_read_only_postgresql_keeps_decisions_in_the_spool_never_in_quarantine(
    tmp_path, pg_server
):
    policy = example_policy()
    records = example_decisions(3, policy, seed=1)
    spool = tmp_path / "spool"
    with temporary_pg_database(pg_server, "moderation_ro") as url:
        upgrade(url)
        set_read_only(url, True)
        with DecisionLog(url, spool_dir=spool) as log:
            log.register_policy(policy)  # no abort: the policy waits in the spool
            log.write(records)
            assert (log.counts.spooled, log.counts.refused, log.counts.quarantined) == (3, 0, 0)
        # A replay while the database is still read-only stops; nothing goes to quarantine.
        result = run("db", "replay", "--db", url, "--spool", spool, code=1)
        assert "read-only transaction" in result.output
        assert count_quarantine(spool).empty
        assert count_folder(spool).decisions == 3
        set_read_only(url, False)
        result = run("db", "replay", "--db", url, "--spool", spool)
        assert result.output == f"replayed 3 decisions from {spool}\n"
        assert stored_ids(url) == {r.id for r in records}
        assert count_folder(spool).empty and count_quarantine(spool).empty


@pytest.mark.postgres
def test_check_against_a_read_only_postgresql_judges_and_spools(
    tmp_path, pg_server, tiny_clip_dir, monkeypatch
):
    from moderation.demo import sample_images

    photos = tmp_path / "photos"
    photos.mkdir()
    sample_images(photos, n=2)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"policy: ro\nmodel: {tiny_clip_dir}\nconcepts:\n"
        "  - name: any\n    prompts: [a photo]\n    threshold: -1\n    action: blackout\n"
    )
    spool = tmp_path / "spool"
    monkeypatch.setenv("MODERATION_SPOOL_DIR", str(spool))
    monkeypatch.setenv("MODERATION_HELD_DIR", str(tmp_path / "held"))
    with temporary_pg_database(pg_server, "moderation_ro") as url:
        upgrade(url)
        set_read_only(url, True)
        result = run("check", photos, "--policy", policy, "--db", url)
        assert result.stdout.splitlines()[-1] == (
            f"2 images: 2 flag; spooled 2 decisions to {spool} (database unreachable)"
        )
        status = run("db", "status", "--db", url, "--spool", spool, "--json")
        assert json.loads(status.stdout)["spool"]["decisions"] == 2
        set_read_only(url, False)


@pytest.mark.parametrize(
    ("sqlstate", "kind"),
    [
        ("25006", "unavailable"),  # read_only_sql_transaction (a standby, read-only database)
        ("57P01", "unavailable"),  # admin_shutdown
        ("53300", "unavailable"),  # too_many_connections
        ("40001", "unavailable"),  # serialization_failure
        ("40P01", "unavailable"),  # deadlock_detected
        ("08006", "unavailable"),  # connection_failure
        ("3D000", "configuration"),  # invalid_catalog_name: no such database
        ("28P01", "configuration"),  # invalid_password
        ("42501", "configuration"),  # insufficient_privilege
        ("23505", None),  # unique_violation: a refusal of these rows
    ],
)
def test_server_states_are_classified_by_sqlstate(sqlstate, kind):
    from sqlalchemy import exc

    class DriverError(Exception):
        pass

    orig = DriverError("x")
    orig.sqlstate = sqlstate
    assert classify(exc.InternalError("INSERT", {}, orig)) == kind


def test_a_read_only_sqlite_file_is_an_outage_not_a_refusal(tmp_path):
    policy = example_policy()
    path = tmp_path / "ro.db"
    upgrade(f"sqlite:///{path}")
    url = f"sqlite:///file:{path}?mode=ro&uri=true"
    with DecisionLog(url, spool_dir=tmp_path / "spool") as log:
        log.register_policy(policy)
        log.write(example_decisions(2, policy))
        assert (log.counts.spooled, log.counts.refused) == (2, 0)
        assert isinstance(log._unavailable, DatabaseUnavailableError)
    storage_db.dispose(url)


# -- item 4: a replay that leaves decisions in quarantine says so --------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def outage(request, tmp_path):
    """(URL of a database that is unreachable now, a function that brings it up), per backend."""
    if request.param == "sqlite":
        folder = tmp_path / "later"
        url = f"sqlite:///{folder / 'log.db'}"
        yield url, folder.mkdir
        storage_db.dispose(url)
    else:
        with pg_database_later(request.getfixturevalue("pg_server")) as (url, create):
            yield url, create


def test_a_replay_that_leaves_decisions_in_quarantine_says_so_and_fails(outage, tmp_path):
    url, bring_up = outage
    spool = tmp_path / "spool"
    policy = example_policy()
    good, bad = example_decisions(3, policy, seed=1), example_decisions(2, policy, seed=2)
    for record in bad:
        record.policy_digest = "f" * 64  # the database refuses them: no such policy
    with DecisionLog(url, spool_dir=spool) as down:
        down.register_policy(policy)
        down.write(good)
        down.write(bad)
    status = run("db", "status", "--db", url, "--spool", spool, code=1)  # database down
    assert f"spool {spool}: 5 decisions in 1 file(s) (`moderation db replay`)" in status.output
    bring_up()
    result = run("db", "replay", "--db", url, "--spool", spool, code=1)
    quarantine = spool / "quarantine"
    assert result.stdout == f"replayed 3 decisions from {spool}\n"
    assert result.output.endswith(
        f"Error: 2 decisions in 1 file(s) wait in the quarantine {quarantine} (the database "
        f"refused them, or they could not be read): fix the cause, then `moderation db replay --spool {quarantine}`\n"
    )
    # A later replay adds nothing, and still does not say "replayed 0" and exit 0.
    again = run("db", "replay", "--db", url, "--spool", spool, code=1)
    assert again.stdout == f"replayed 0 decisions from {spool}\n"
    assert "2 decisions in 1 file(s) wait in the quarantine" in again.output
    status = run("db", "status", "--db", url, "--spool", spool, "--json", code=1)
    shown = json.loads(status.stdout)
    assert shown["spool"]["decisions"] == 0
    assert (shown["quarantine"]["decisions"], shown["quarantine"]["files"]) == (2, 1)
    assert shown["error"] is None and shown["current"] == shown["head"]
    assert stored_ids(url) == {r.id for r in good}


def test_db_status_of_a_healthy_database_and_an_empty_spool_exits_0(tmp_path):
    url = f"sqlite:///{tmp_path / 'ok.db'}"
    upgrade(url)
    result = run("db", "status", "--db", url, "--spool", tmp_path / "spool")
    lines = result.output.splitlines()
    assert lines[0].startswith(f"{url}: revision ") and lines[0].endswith("up to date)")
    assert lines[1:] == [
        f"spool {tmp_path / 'spool'}: empty",
        f"quarantine {tmp_path / 'spool' / 'quarantine'}: empty",
    ]
    storage_db.dispose(url)


# -- issue 19 item 5: configuration errors are not outages ---------------------------------


@pytest.fixture
def nosuch_pg(pg_server):
    name = f"moderation_nosuch_{secrets.token_hex(4)}"
    url = make_url(pg_server).set(database=name).render_as_string(hide_password=False)
    yield url, name
    storage_db.dispose(url)


@pytest.mark.postgres
def test_a_database_that_does_not_exist_fails_at_once_and_spools_nothing(tmp_path, nosuch_pg):
    url, name = nosuch_pg
    spool = tmp_path / "spool"
    policy = example_policy()
    with DecisionLog(url, spool_dir=spool) as log:
        with pytest.raises(DatabaseConfigurationError, match=f'database "{name}" does not exist'):
            log.register_policy(policy)
        with pytest.raises(UnrecordedError, match="recorded nowhere") as raised:
            log.write(example_decisions(2, policy))
        assert len(raised.value.decision_ids) == 2
    assert not spool.exists() or not list(spool.iterdir())


@pytest.mark.postgres
def test_check_names_the_server_reason_for_a_missing_or_unmigrated_database(
    tmp_path, pg_server, nosuch_pg, tiny_clip_dir, monkeypatch
):
    from moderation.demo import sample_images

    photos = tmp_path / "photos"
    photos.mkdir()
    sample_images(photos, n=1)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"policy: cfg\nmodel: {tiny_clip_dir}\nconcepts:\n"
        "  - name: any\n    prompts: [a photo]\n    threshold: -1\n    action: blackout\n"
    )
    spool = tmp_path / "spool"
    monkeypatch.setenv("MODERATION_SPOOL_DIR", str(spool))
    monkeypatch.setenv("MODERATION_HELD_DIR", str(tmp_path / "held"))
    url, name = nosuch_pg
    result = run("check", photos, "--policy", policy, "--db", url, code=1)
    assert f'database "{name}" does not exist' in result.output
    assert result.output.count("\n") == 1 and "spooled 1" not in result.output
    with temporary_pg_database(pg_server, "moderation_unmigrated") as fresh:
        result = run("check", photos, "--policy", policy, "--db", fresh, code=1)
        assert "has no schema yet; run `moderation db upgrade --db URL` first" in result.output
    assert not spool.exists() or not list(spool.glob("*.spool"))


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            "sqlite://demo/moderation.db",
            "Error: invalid database URL 'sqlite://demo/moderation.db': a SQLite URL has no "
            "host; did you mean `sqlite:///demo/moderation.db` (relative) or "
            "`sqlite:////demo/moderation.db` (absolute)?\n",
        ),
        (
            "demo/moderation.db",
            "Error: invalid database URL 'demo/moderation.db': not a URL (BACKEND://...); did "
            "you mean `sqlite:///demo/moderation.db`?\n",
        ),
    ],
)
@pytest.mark.parametrize("command", [["review", "list"], ["db", "status"], ["decisions", "list"]])
def test_a_mistyped_sqlite_url_gets_a_did_you_mean(tmp_path, monkeypatch, given, message, command):
    monkeypatch.chdir(tmp_path)
    result = run(*command, "--db", given, code=1)
    assert result.output.endswith(message)
    assert not (tmp_path / "moderation.db").exists() and not (tmp_path / "demo").exists()


# -- item 10: readers open existing databases only ------------------------------------------


def test_python_readers_never_create_a_database(tmp_path):
    from moderation.decisions.browser import DecisionBrowser
    from moderation.review.queue import ReviewQueue

    typo = tmp_path / "typo.db"
    for reader in (ReviewQueue, DecisionBrowser):
        with pytest.raises(StorageError, match="no database at .*`moderation db upgrade"):
            reader(f"sqlite:///{typo}")
        assert not typo.exists()
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(StorageError, match="has no schema yet"):
        ReviewQueue(f"sqlite:///{empty}")
    import sqlite3

    with contextlib.closing(sqlite3.connect(empty)) as conn:  # not migrated
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []
    storage_db.dispose(f"sqlite:///{empty}")


@pytest.mark.postgres
def test_python_readers_name_a_postgresql_database_that_does_not_exist(nosuch_pg):
    from moderation.review.queue import ReviewQueue

    url, name = nosuch_pg
    with pytest.raises(DatabaseConfigurationError, match=f'database "{name}" does not exist'):
        ReviewQueue(url)
