"""Alembic migrations: up/down/up, no drift from the models, schema checks and `db` commands."""

from __future__ import annotations

import importlib
import json
import sqlite3
from datetime import datetime, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import inspect, text

from moderation.bench.records import example_decisions, example_policy
from moderation.cli import main
from moderation.storage import (
    Base,
    DecisionLog,
    SchemaVersionError,
    StorageError,
    current,
    downgrade,
    get_engine,
    head_revision,
    immediate_transaction,
    upgrade,
)
from moderation.storage import db as storage_db
from tests.pg import temporary_pg_database

TABLES = {
    "policies",
    "decisions",
    "review_items",
    "review_events",
    "desk_users",
    "desk_sessions",
    "desk_events",
    "webhooks",
    "webhook_outbox",
    "api_keys",
}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_url(request, tmp_path):
    """An empty database on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'm.db'}"
        yield url
        storage_db.dispose(url)
    else:
        with temporary_pg_database(request.getfixturevalue("pg_server")) as url:
            yield url


def tables(url: str) -> set[str]:
    with storage_db.engine_for(url).connect() as conn:
        return set(inspect(conn).get_table_names()) - {"alembic_version"}


def drift(url: str) -> list:
    with storage_db.engine_for(url).connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def test_up_down_up_without_drift(empty_url):
    upgrade(empty_url)
    assert current(empty_url) == head_revision()
    assert tables(empty_url) == TABLES
    assert drift(empty_url) == []

    downgrade(empty_url, "base")
    assert current(empty_url) is None
    assert tables(empty_url) == set()

    upgrade(empty_url, "head")
    assert tables(empty_url) == TABLES
    assert drift(empty_url) == []


def test_fresh_sqlite_is_migrated_on_first_use(tmp_path):
    from moderation.bench.records import example_policy
    from moderation.storage import DecisionLog

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    with DecisionLog(url, spool_dir=tmp_path / "spool") as log:  # a writer creates it
        log.register_policy(example_policy())
    engine = get_engine(url)
    assert current(url) == head_revision()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    storage_db.dispose(url)


def test_database_behind_head_asks_for_upgrade(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url)
    downgrade(url, "base")  # tables gone, alembic_version left empty: "no schema yet"
    with storage_db.engine_for(url).begin() as conn:
        conn.exec_driver_sql("CREATE TABLE decisions (id TEXT)")  # an old, unmanaged database
    storage_db.dispose(url)
    with pytest.raises(SchemaVersionError, match=r"run `moderation db upgrade --db URL` first"):
        get_engine(url)


def test_unknown_revision_is_named(tmp_path):
    url = f"sqlite:///{tmp_path / 'future.db'}"
    upgrade(url)
    with storage_db.engine_for(url).begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'zz99'")
    storage_db.dispose(url)
    with pytest.raises(SchemaVersionError, match="revision zz99, which this version"):
        get_engine(url)


@pytest.mark.postgres
def test_fresh_postgres_is_not_migrated_silently(pg_server):
    with temporary_pg_database(pg_server) as url:
        with pytest.raises(SchemaVersionError, match="has no schema yet; run `moderation db"):
            get_engine(url)


def test_unreachable_database_is_a_storage_error():
    with pytest.raises(StorageError, match="cannot reach database postgresql"):
        get_engine("postgresql+psycopg://postgres@127.0.0.1:1/x")


def test_resolve_db_url(monkeypatch):
    monkeypatch.delenv("MODERATION_DB_URL", raising=False)
    assert storage_db.resolve_db_url() == "sqlite:///moderation.db"
    monkeypatch.setenv("MODERATION_DB_URL", "postgresql://u@h/d")
    assert storage_db.resolve_db_url() == "postgresql+psycopg://u@h/d"
    assert storage_db.resolve_db_url("sqlite:///x.db") == "sqlite:///x.db"


def test_db_commands(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    result = runner.invoke(main, ["db", "upgrade", "--db", url], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"to {head_revision()}" in result.output

    result = runner.invoke(main, ["db", "current", "--db", url, "--json"])
    assert json.loads(result.output) == {
        "url": url,
        "current": head_revision(),
        "head": head_revision(),
    }

    result = runner.invoke(main, ["db", "downgrade", "--db", url, "--revision", "base"])
    assert result.exit_code == 0 and "to base" in result.output
    result = runner.invoke(main, ["db", "current", "--db", url])
    assert "revision none" in result.output and "run `moderation db upgrade`" in result.output

    result = runner.invoke(main, ["db", "upgrade", "--db", url, "--revision", "nope"])
    assert result.exit_code == 1
    assert "cannot migrate" in result.output and "'nope'" in result.output
    storage_db.dispose(url)


def test_db_commands_have_help():
    runner = CliRunner()
    for command in ("upgrade", "downgrade", "current", "replay"):
        result = runner.invoke(main, ["db", command, "--help"])
        assert result.exit_code == 0 and "--db" in result.output


def test_immediate_transaction_takes_the_write_lock(tmp_path):
    url = f"sqlite:///{tmp_path / 'lock.db'}"
    upgrade(url)
    engine = get_engine(url)
    other = sqlite3.connect(tmp_path / "lock.db", timeout=0, isolation_level=None)
    with immediate_transaction(engine):
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
    other.execute("BEGIN IMMEDIATE")  # free again once committed
    other.execute("ROLLBACK")
    other.close()
    storage_db.dispose(url)


@pytest.fixture
def behind_url(tmp_path):
    """A database one revision behind this version of the code."""
    url = f"sqlite:///{tmp_path / 'behind.db'}"
    upgrade(url, PREVIOUS)
    yield url
    storage_db.dispose(url)


PREVIOUS = "0003"


def test_database_behind_the_code_asks_for_upgrade(behind_url):
    message = (
        f"database {behind_url} is at revision {PREVIOUS}, this version needs {head_revision()}; "
        "run `moderation db upgrade --db URL` first"
    )
    with pytest.raises(SchemaVersionError) as caught:
        get_engine(behind_url)
    assert str(caught.value) == message


def test_writes_to_an_old_schema_are_kept_and_reported(tmp_path, behind_url):
    url = behind_url
    policy = example_policy()
    with DecisionLog(url, spool_dir=tmp_path / "spool") as log:
        with pytest.raises(SchemaVersionError):
            log.register_policy(policy)
        with pytest.raises(StorageError, match="the 3 decisions are kept in the spool"):
            log.write(example_decisions(3, policy))
    assert len(list((tmp_path / "spool").glob("*.spool"))) == 1


def test_old_rows_survive_every_migration_up_and_down(empty_url):
    """Rows written at 0001 are intact at head (new columns empty) and after going back down."""
    upgrade(empty_url, "0001")
    policy = example_policy()
    old = {
        "digest": policy.digest,
        "name": policy.name,
        "version": policy.version,
        "model_id": policy.model_id,
        "compat": None,
        "source": policy.source,
        "concepts": policy.concepts,
        "special_concepts": policy.special_concepts,
        "adjustment": 0.01,
        "escalate": "review",
        "review_band": 0.0,
        "created_at": datetime(2025, 1, 1, tzinfo=timezone.utc),
    }
    decision = {
        "id": "00000000-0000-4000-8000-000000000001",
        "created_at": datetime(2025, 1, 1, tzinfo=timezone.utc),
        "policy_digest": policy.digest,
        "model_id": "tiny-clip",
        "image_sha256": None,
        "verdict": "review",
        "action": "review",
        "top_concept": "gore",
        "margin": 0.01,
        "fired": ["gore"],
        "special_hits": [],
        "adjustment": 0.0,
        "cosines": b"\0" * 16,
        "scores": b"\0" * 16,
        "special_cosines": b"\0" * 4,
        "special_scores": b"\0" * 4,
        "embedding": b"\0" * 8,
        "meta": {"prompt": "p"},
        "error": None,
        "held_path": "ab/abcd.png",
    }
    item = {
        "decision_id": decision["id"],
        "status": "pending",
        "priority": 0,
        "margin": 0.01,
        "created_at": decision["created_at"],
        "updated_at": decision["created_at"],
    }
    engine = storage_db.engine_for(empty_url)
    with engine.begin() as conn:
        for table, row in (("policies", old), ("decisions", decision), ("review_items", item)):
            conn.execute(Base.metadata.tables[table].insert().values(**row))
    storage_db.dispose(empty_url)

    upgrade(empty_url, "head")
    assert drift(empty_url) == []
    with storage_db.engine_for(empty_url).connect() as conn:
        got = conn.exec_driver_sql(
            "SELECT id, held_path, views, concept_views, special_views, shadow_of FROM decisions"
        ).one()
        labels = conn.exec_driver_sql("SELECT labels FROM review_items").scalar_one()
    assert tuple(got) == (decision["id"], "ab/abcd.png", None, None, None, None)
    assert labels is None

    downgrade(empty_url, "0001")
    with storage_db.engine_for(empty_url).connect() as conn:
        assert conn.exec_driver_sql("SELECT id, held_path FROM decisions").one() == (
            decision["id"],
            "ab/abcd.png",
        )
        columns = {c["name"] for c in inspect(conn).get_columns("decisions")}
    assert {"views", "concept_views", "special_views", "shadow_of"}.isdisjoint(columns)
    storage_db.dispose(empty_url)


def test_downgrading_shadow_drops_only_shadow_rows(empty_url, tmp_path):
    upgrade(empty_url)
    policy = example_policy()
    live, shadow = example_decisions(2, policy)
    shadow.shadow_of = live.id
    with DecisionLog(empty_url, spool_dir=tmp_path / "spool", held_dir=tmp_path / "held") as log:
        log.register_policy(policy)
        log.write([live, shadow])
    downgrade(empty_url, "0002")
    with storage_db.engine_for(empty_url).connect() as conn:
        ids = conn.exec_driver_sql("SELECT id FROM decisions").scalars().all()
    assert ids == [live.id]
    upgrade(empty_url)


def test_encoder_digest_migration_keeps_rows_up_and_down(empty_url, tmp_path):
    """0006 adds decisions.encoder_digest and value_range: a row written at head keeps them,
    going back down keeps every row (without the columns), and rows written before the
    upgrade read NULL (not recorded then)."""
    migration = importlib.import_module("migrations.versions.0006_encoder_digest")
    policy = example_policy()
    new, old = example_decisions(2, policy)
    new.encoder_digest, new.value_range = "e" * 64, "both"
    upgrade(empty_url)
    with DecisionLog(empty_url, spool_dir=tmp_path / "spool", held_dir=tmp_path / "held") as log:
        log.register_policy(policy)
        log.write([new])
    select_new = "SELECT encoder_digest, value_range FROM decisions"
    with storage_db.engine_for(empty_url).connect() as conn:
        assert conn.exec_driver_sql(select_new).one() == ("e" * 64, "both")
    storage_db.dispose(empty_url)

    downgrade(empty_url, migration.down_revision)
    with storage_db.engine_for(empty_url).begin() as conn:
        columns = {c["name"] for c in inspect(conn).get_columns("decisions")}
        assert {"encoder_digest", "value_range"}.isdisjoint(columns)
        # A row written by the code of the previous revision.
        values = {
            "id": old.id,
            "created_at": old.created_at,
            "policy_digest": policy.digest,
            "model_id": old.model_id,
            "verdict": old.verdict,
            "action": old.action,
            "fired": "[]",
            "special_hits": "[]",
            "adjustment": 0.0,
            "cosines": b"",
            "scores": b"",
            "special_cosines": b"",
            "special_scores": b"",
            "meta": "{}",
        }
        names, params = ", ".join(values), ", ".join(f":{k}" for k in values)
        conn.execute(text(f"INSERT INTO decisions ({names}) VALUES ({params})"), values)
        assert conn.exec_driver_sql("SELECT count(*) FROM decisions").scalar() == 2
    storage_db.dispose(empty_url)

    upgrade(empty_url, "head")
    assert drift(empty_url) == []
    with storage_db.engine_for(empty_url).connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, encoder_digest, value_range FROM decisions").all()
    assert sorted(rows) == sorted([(old.id, None, None), (new.id, None, None)])
    storage_db.dispose(empty_url)


def test_spool_records_written_before_0006_replay_with_null_digests(tmp_path):
    """A record spooled by older code has no encoder_digest/value_range: it replays as NULL,
    also in one insert with newer records."""
    from moderation.storage import inserts
    from moderation.storage.records import decision_row, row_from_json, row_to_json

    policy = example_policy()
    older, newer = example_decisions(2, policy)
    newer.encoder_digest = "d" * 64
    spooled = [row_to_json(decision_row(r, None)) for r in (older, newer)]
    for name in ("encoder_digest", "value_range"):
        del spooled[0][name]
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    with DecisionLog(url, spool_dir=tmp_path / "spool") as log:
        log.register_policy(policy)
    with storage_db.engine_for(url).begin() as conn:
        inserts.insert_decisions(conn, [row_from_json(r) for r in spooled], [None, None])
        rows = dict(conn.exec_driver_sql("SELECT id, encoder_digest FROM decisions").all())
    assert rows == {older.id: None, newer.id: "d" * 64}
    storage_db.dispose(url)
