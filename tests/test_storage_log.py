"""DecisionLog: exact round trips, idempotent batches, review items, and the spool when the DB is down."""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from moderation.bench.records import example_decisions, example_policy
from moderation.cli import main
from moderation.storage import (
    DecisionLog,
    DecisionRow,
    PolicyRow,
    ReviewEvent,
    ReviewItem,
    StorageError,
    upgrade,
)
from moderation.storage import db as storage_db
from moderation.storage import log as log_module
from moderation.storage import records as storage_records
from moderation.storage import schema as storage_schema
from moderation.storage.errors import PartlyRecordedError
from tests.pg import BACKENDS, pg_database_later, pg_test_url, scratch_url, temporary_pg_database

DOWN_PG = "postgresql+psycopg://postgres@127.0.0.1:1/x"


@pytest.fixture(scope="module")
def pg_server() -> str:
    url = pg_test_url()
    if url is None:
        pytest.skip("MODERATION_TEST_PG_URL is not set")
    return url


@pytest.fixture(scope="module")
def pg_database(pg_server) -> str:
    """One migrated PostgreSQL database for this module, dropped at its end."""
    with temporary_pg_database(pg_server) as url:
        upgrade(url)
        yield url


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path):
    """A migrated, empty database on each backend."""
    with scratch_url(
        request.param, tmp_path, "log", lambda: request.getfixturevalue("pg_database")
    ) as url:
        yield url


@pytest.fixture(params=BACKENDS)
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


@pytest.fixture
def log(url, tmp_path):
    with DecisionLog(url, spool_dir=tmp_path / "spool", held_dir=tmp_path / "held") as log:
        yield log


def spooled_ids(folder) -> set[str]:
    """Ids of every decision in the spool files of a folder (read without claiming)."""
    from moderation.storage.spool_format import scan

    ids = set()
    for path in folder.glob("*.spool"):
        fd = os.open(path, os.O_RDONLY)
        try:
            for record in scan(fd):
                if record.kind == "decisions":
                    ids.update(row["id"] for row in record.payload()["rows"])
        finally:
            os.close(fd)
    return ids


def count(url: str, model) -> int:
    with storage_db.engine_for(url).connect() as conn:
        return conn.execute(select(func.count()).select_from(model)).scalar_one()


def test_batch_round_trips_exactly(log, url):
    policy = example_policy()
    log.register_policy(policy)
    records = example_decisions(50, policy, dim=768)
    records[3].created_at = datetime(2025, 6, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    records[4].meta = {"prompt": "ünïcode ✓", "seed": np.int64(7), "nested": {"a": [1, 2.5]}}
    records[5].embedding = None
    records[5].error = "could not decode image"
    records[5].margin = None
    log.write(records)

    for want in records:
        got = log.get(want.id)
        assert got is not None
        for name in ("cosines", "scores", "special_cosines", "special_scores"):
            assert getattr(got, name).dtype == np.float32
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
        if want.embedding is None:
            assert got.embedding is None
        else:
            assert got.embedding.dtype == np.float16
            np.testing.assert_array_equal(got.embedding, want.embedding.reshape(1, -1))
        assert got.created_at == want.created_at and got.created_at.tzinfo == timezone.utc
        for name in ("policy_digest", "verdict", "action", "top_concept", "margin", "fired"):
            assert getattr(got, name) == getattr(want, name)
        assert got.error == want.error
    assert log.get(records[4].id).meta == {
        "prompt": "ünïcode ✓",
        "seed": 7,
        "nested": {"a": [1, 2.5]},
    }
    assert log.get("no-such-id") is None


def test_write_is_idempotent_and_queues_reviews_once(log, url):
    policy = example_policy()
    log.register_policy(policy)
    log.register_policy(policy)  # stored once per digest
    records = example_decisions(40, policy, review_every=4)  # 10 need review, 5 of them priority
    log.write(records)
    log.write(records)  # a retry of the same batch adds nothing
    log.write(records[:5] + records[:5])  # repeats inside a batch too
    assert count(url, PolicyRow) == 1
    assert count(url, DecisionRow) == 40
    assert count(url, ReviewItem) == 10
    assert count(url, ReviewEvent) == 10
    with storage_db.engine_for(url).connect() as conn:
        items = conn.execute(select(ReviewItem.__table__).order_by(ReviewItem.id)).all()
        events = conn.execute(select(ReviewEvent.__table__)).all()
    assert {i.status for i in items} == {"pending"}
    assert sum(i.priority for i in items) == 5
    assert {(e.event, e.actor) for e in events} == {("created", "system")}
    assert {e.item_id for e in events} == {i.id for i in items}
    assert sorted((e.item_id, e.details["priority"], e.details["margin"]) for e in events) == [
        (i.id, i.priority, i.margin) for i in items
    ]
    queued = [r for r in records if r.needs_review]
    assert [(i.decision_id, i.priority, i.margin) for i in items] == [
        (r.id, r.priority, pytest.approx(r.margin)) for r in queued
    ]
    assert items[0].created_at == records[0].created_at


def test_unregistered_policy_is_a_clear_error_and_the_batch_is_kept(log):
    records = example_decisions(2, example_policy("never-registered"))
    with pytest.raises(PartlyRecordedError) as caught:
        log.write(records)
    assert "is the policy of every decision registered first?" in str(caught.value)
    assert f"the 2 decisions are kept in the spool {log.spool.folder}" in str(caught.value)
    assert caught.value.decision_ids == [r.id for r in records]
    assert spooled_ids(log.spool.folder) == {r.id for r in records}
    assert log.counts.refused == 2 and log.counts.logged == 0


def test_database_down_spools_then_replays_exactly_once(url, tmp_path):
    spool = tmp_path / "spool"
    policy = example_policy()
    records = example_decisions(1000, policy, review_every=10)
    with DecisionLog(DOWN_PG, spool_dir=spool, held_dir=tmp_path / "held") as down:
        down.register_policy(policy)
        down.write(records)  # does not raise: the batch goes to the spool
    assert [p.suffix for p in spool.iterdir()] == [".spool"]

    with DecisionLog(url, spool_dir=spool, held_dir=tmp_path / "held") as up:
        assert up.replay(into_other_database=True) == 1000
        assert up.replay() == 0
    assert count(url, DecisionRow) == 1000
    assert count(url, ReviewItem) == 100
    assert list(spool.iterdir()) == []


def test_unusable_sqlite_path_spools(tmp_path):
    missing = f"sqlite:///{tmp_path / 'no' / 'such' / 'folder' / 'x.db'}"
    policy = example_policy()
    with DecisionLog(missing, spool_dir=tmp_path / "spool") as log:
        log.register_policy(policy)
        log.write(example_decisions(3, policy))
    assert len(list((tmp_path / "spool").glob("*.spool"))) == 1


def test_next_successful_write_replays_the_spool_first(outage, tmp_path):
    url, bring_up = outage
    spool = tmp_path / "spool"
    policy = example_policy()
    first, second = example_decisions(20, policy, seed=1), example_decisions(5, policy, seed=2)
    with DecisionLog(url, spool_dir=spool) as down:
        down.register_policy(policy)
        down.write(first)
        assert down.counts.spooled == 20
    bring_up()
    with DecisionLog(url, spool_dir=spool) as up:
        up.write(second)
        assert (up.counts.replayed, up.counts.logged) == (20, 5)
    assert count(url, DecisionRow) == 25
    assert list(spool.glob("*.spool")) == []


def test_db_replay_command(url, tmp_path):
    spool = tmp_path / "spool"
    policy = example_policy()
    with DecisionLog(DOWN_PG, spool_dir=spool) as down:
        down.register_policy(policy)
        down.write(example_decisions(7, policy))
    (path,) = spool.glob("*.spool")
    runner = CliRunner()
    args = ["db", "replay", "--db", url, "--spool", str(spool)]
    result = runner.invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 1
    assert result.output == (
        f"Error: replayed 0 decisions into {storage_db.display_url(url)}, and left 1 spool "
        f"file(s) alone: {path}: is meant for {DOWN_PG} (replay them with --db set to their "
        "database, or pass --into-other-database to replay them here)\n"
    )
    assert path.exists()
    result = runner.invoke(main, [*args, "--into-other-database"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output == f"replayed 7 decisions from {spool}\n"
    result = runner.invoke(main, [*args, "--json"], catch_exceptions=False)
    assert json.loads(result.output) == {
        "added": 0,
        "discarded": [],
        "quarantined": [],
        "other_database": [],
        "quarantine": {
            "folder": str(spool / "quarantine"),
            "files": 0,
            "decisions": 0,
            "unreadable": 0,
        },
    }


def test_replay_into_an_unreachable_database_fails_clearly(tmp_path):
    policy = example_policy()
    with DecisionLog(DOWN_PG, spool_dir=tmp_path) as down:
        down.register_policy(policy)
        down.write(example_decisions(1, policy))
    result = CliRunner().invoke(main, ["db", "replay", "--db", DOWN_PG, "--spool", str(tmp_path)])
    assert result.exit_code == 1
    assert "Error: cannot reach database postgresql+psycopg://postgres@127.0.0.1:1/x" in (
        result.output
    )
    assert len(list(tmp_path.glob("*.spool"))) == 1  # nothing lost


def test_closed_log_refuses_writes(tmp_path):
    log = DecisionLog(f"sqlite:///{tmp_path / 'c.db'}", spool_dir=tmp_path / "s")
    log.close()
    log.close()
    with pytest.raises(StorageError, match="closed"):
        log.write(example_decisions(1, example_policy()))
    assert not os.path.exists(tmp_path / "s")


@pytest.mark.parametrize("bad", [object(), float("nan")], ids=["object", "nan"])
def test_meta_that_is_not_json_is_named(log, bad):
    policy = example_policy()
    log.register_policy(policy)
    records = example_decisions(2, policy)
    records[1].meta = {"value": bad}
    with pytest.raises(StorageError, match=f"decision {records[1].id}: meta cannot be stored"):
        log.write(records)
    assert log.get(records[0].id) is None  # the batch is one transaction


def test_a_poisoned_spool_does_not_block_new_decisions(outage, tmp_path, caplog):
    url, bring_up = outage
    spool = tmp_path / "spool"
    policy = example_policy()
    orphan = example_decisions(3, example_policy("never-registered"), seed=5)
    good = example_decisions(6, policy, seed=6)
    with DecisionLog(url, spool_dir=spool) as down:
        down.register_policy(policy)
        down.write(good[:3])
        down.write(orphan)  # its policy was never registered anywhere
        down.write(good[3:])
    (path,) = spool.glob("*.spool")
    bring_up()
    fresh = example_decisions(4, policy, seed=7)
    with DecisionLog(url, spool_dir=spool) as up:
        up.write(fresh)  # replays the spool first: the orphans are set aside, named
        assert up.counts.replayed == 6 and up.counts.quarantined == 3
        (report,) = up.quarantined
    assert report.startswith(
        f"{path}: quarantined 3 decision(s) the database refused "
        f"({', '.join(r.id for r in orphan)}): "
    )
    assert report.endswith(f"; kept in {spool / 'quarantine' / path.name}")
    assert count(url, DecisionRow) == 10
    assert list(spool.glob("*.spool")) == []
    assert spooled_ids(spool / "quarantine") == {r.id for r in orphan}
    assert any(report in r.getMessage() for r in caplog.records)


def test_optional_fields_may_all_be_empty(log):
    policy = example_policy()
    log.register_policy(policy)
    records = example_decisions(3, policy)
    for r in records:
        r.embedding = r.image_sha256 = r.top_concept = r.margin = None
        r.fired, r.meta = [], {}
        r.special_cosines = r.special_scores = np.zeros(0, np.float32)  # a policy with S = 0
    records[0].margin = float("nan")  # stored as "no margin" on every backend
    log.write(records)
    got = log.get(records[0].id)
    assert got.embedding is None and got.margin is None and got.fired == [] and got.meta == {}
    assert got.special_scores.shape == (0,)


def test_concurrent_writers_share_one_log(log, url):
    policy = example_policy()
    log.register_policy(policy)
    batches = [example_decisions(100, policy, seed=k, dim=16, review_every=9) for k in range(8)]
    threads = [threading.Thread(target=log.write, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert count(url, DecisionRow) == 800
    assert count(url, ReviewItem) == count(url, ReviewEvent) == 8 * 12


def test_one_log_recovers_when_the_database_comes_back(tmp_path, monkeypatch):
    monkeypatch.setattr(log_module, "RETRY_MIN_S", 0.0)  # retry the database on every batch
    folder = tmp_path / "later"
    url = f"sqlite:///{folder / 'x.db'}"
    policy = example_policy()
    with DecisionLog(url, spool_dir=tmp_path / "spool") as log:
        log.register_policy(policy)
        log.write(example_decisions(10, policy, seed=1))  # folder missing: spooled
        folder.mkdir()
        log.write(example_decisions(10, policy, seed=2))  # replays the spool, then writes
        assert count(url, DecisionRow) == 20
        assert count(url, PolicyRow) == 1
    assert list((tmp_path / "spool").glob("*.spool")) == []
    storage_db.dispose(url)


def test_sqlite_fast_path_stores_what_sqlalchemy_would(tmp_path):
    policy = example_policy()
    fast, orm = (f"sqlite:///{tmp_path / name}" for name in ("fast.db", "orm.db"))
    records = example_decisions(3, policy)
    records[1].created_at = datetime(2025, 3, 1, 9, 30, 15, 7, tzinfo=timezone(timedelta(hours=-5)))
    records[2].meta = {"prompt": "café ✓", "tags": ["a"]}
    with DecisionLog(fast, spool_dir=tmp_path / "s") as log:
        log.register_policy(policy)
        log.write(records)
    storage_schema.upgrade(orm)  # get_engine opens existing databases only
    with storage_schema.get_engine(orm).begin() as conn:
        conn.execute(PolicyRow.__table__.insert(), [storage_records.policy_row(policy)])
        conn.execute(
            DecisionRow.__table__.insert(), [storage_records.decision_row(r, None) for r in records]
        )
    query = "SELECT * FROM decisions ORDER BY id"
    stored = []
    for url in (fast, orm):
        with storage_db.engine_for(url).connect() as conn:
            stored.append(conn.exec_driver_sql(query).all())  # raw column text and bytes
        storage_db.dispose(url)
    assert stored[0] == stored[1]
