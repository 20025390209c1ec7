"""BackgroundDecisionLog: queued, coalesced, bounded writes that never lose a decision."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

import pytest
from sqlalchemy import create_engine, text

from moderation.bench.records import example_decisions, example_policy
from moderation.storage import DecisionLog, StorageError
from moderation.storage.background import BackgroundDecisionLog, LogWriterError


class RecordingLog:
    """A stand-in DecisionLog that records every write; `gate` holds writes until set."""

    def __init__(self, *, fail_on: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.policies: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set once a write is waiting at the gate
        self.fail_on = fail_on  # a decision id whose batch is refused (like a constraint error)
        self.closed = False

    def register_policy(self, record) -> None:
        self.policies.append(record.digest)

    def write(self, records) -> None:
        self.entered.set()
        self.gate.wait()
        ids = [r.id for r in records]
        if self.fail_on in ids:
            raise StorageError(f"refused decision {self.fail_on}")
        self.calls.append(ids)

    def release(self, decision_id: str) -> bytes:
        return decision_id.encode()

    def close(self) -> None:
        self.closed = True

    @property
    def written(self) -> list[str]:
        return [i for call in self.calls for i in call]


def _records(n: int, seed: int = 0):
    return example_decisions(n, example_policy(), dim=8, seed=seed)


def _count(url: str, digest: str) -> tuple[int, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            query = "SELECT count(*), count(DISTINCT id) FROM decisions WHERE policy_digest = :d"
            return tuple(conn.execute(text(query), {"d": digest}).one())
    finally:
        engine.dispose()


def _ids(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return set(conn.execute(text("SELECT id FROM decisions")).scalars())
    finally:
        engine.dispose()


def _spooled_ids(folder) -> set[str]:
    from moderation.storage.spool import Spool

    spool = Spool(folder)
    try:
        paths = spool.claim()
        return {
            row["id"]
            for path in paths
            for payload in spool.entries(path, "decisions")
            for row in payload["rows"]
        }
    finally:
        spool.release_all()
        spool.close()


def test_many_small_writes_from_several_threads_land_exactly_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'log.db'}"
    policy = example_policy()
    records = example_decisions(2000, policy, dim=16, review_every=7)
    writer = BackgroundDecisionLog(DecisionLog(url, spool_dir=tmp_path / "spool"))
    writer.register_policy(policy)

    def produce(part):
        for start in range(0, len(part), 4):
            writer.write(part[start : start + 4])

    threads = [threading.Thread(target=produce, args=(records[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    assert _count(url, policy.digest) == (2000, 2000)
    assert writer.records_written == 2000
    assert writer.transactions < 500  # 500 writes of 4, coalesced into fewer transactions
    assert not writer.failed


def test_queued_batches_are_coalesced_up_to_max_transaction():
    inner = RecordingLog()
    inner.gate.clear()
    writer = BackgroundDecisionLog(inner, max_transaction=10, max_pending=1000)
    records = _records(43)
    writer.write(records[:3])  # taken alone by the thread, which then waits at the gate
    assert inner.entered.wait(5)
    for start in range(3, 43, 4):
        writer.write(records[start : start + 4])
    inner.gate.set()
    writer.flush()
    assert [len(c) for c in inner.calls] == [3, 8, 8, 8, 8, 8]
    assert inner.written == [r.id for r in records]
    writer.close()


def test_a_full_queue_blocks_the_producer_and_drops_nothing():
    inner = RecordingLog()
    inner.gate.clear()
    writer = BackgroundDecisionLog(inner, max_pending=10, max_transaction=100)
    records = _records(30)
    writer.write(records[:5])
    assert inner.entered.wait(5)
    writer.write(records[5:10])  # 10 unwritten: the queue is full
    done = threading.Event()

    def produce_more():
        writer.write(records[10:15])
        writer.write(records[15:30])  # larger than max_pending: waits until nothing is unwritten
        done.set()

    producer = threading.Thread(target=produce_more)
    producer.start()
    assert not done.wait(0.3)  # blocked, not dropped
    assert writer.pending == 10
    inner.gate.set()
    producer.join(5)
    assert done.is_set()
    writer.close()
    assert sorted(inner.written) == sorted(r.id for r in records)
    assert len(inner.written) == 30


def test_close_flushes_everything_and_then_refuses_writes():
    inner = RecordingLog()
    inner.gate.clear()
    writer = BackgroundDecisionLog(inner)
    records = _records(50)
    for start in range(0, 50, 5):
        writer.write(records[start : start + 5])
    threading.Timer(0.2, inner.gate.set).start()
    writer.close()
    assert inner.written == [r.id for r in records]
    assert inner.closed
    with pytest.raises(LogWriterError, match="closed"):
        writer.write(records[:1])
    writer.close()  # idempotent


def test_a_refused_batch_is_kept_and_reraised_without_taking_others_down():
    records = _records(12)
    inner = RecordingLog(fail_on=records[5].id)
    inner.gate.clear()
    writer = BackgroundDecisionLog(inner)
    writer.write(records[:4])
    assert inner.entered.wait(5)
    writer.write(records[4:8])  # refused
    writer.write(records[8:12])  # same transaction as the refused batch, retried on its own
    inner.gate.set()
    with pytest.raises(StorageError, match="refused decision"):
        writer.flush()
    assert inner.written == [r.id for r in records[:4] + records[8:]]
    assert [r.id for r in writer.failed] == [r.id for r in records[4:8]]
    writer.flush()  # the error was reported once
    writer.close()


def test_the_error_is_raised_by_the_next_write_which_still_queues_its_batch():
    records = _records(8)
    inner = RecordingLog(fail_on=records[0].id)
    writer = BackgroundDecisionLog(inner)
    writer.write(records[:4])
    deadline = time.monotonic() + 5
    while not writer.failed and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(StorageError):
        writer.write(records[4:])
    writer.close()
    assert inner.written == [r.id for r in records[4:]]


def test_policy_passes_through():
    inner = RecordingLog()
    with BackgroundDecisionLog(inner) as writer:
        writer.register_policy(example_policy())
    assert inner.policies == [example_policy().digest]
    assert inner.closed


def test_a_database_outage_mid_run_ends_with_every_record_in_db_and_spool(
    tmp_path, monkeypatch, caplog
):
    from moderation.storage import db

    # A locked SQLite database is unavailable after the busy timeout: keep that short.
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_S", 0.05)
    path = tmp_path / "log.db"
    url = f"sqlite:///{path}"
    spool = tmp_path / "spool"
    policy = example_policy()
    records = example_decisions(600, policy, dim=16, review_every=5)
    writer = BackgroundDecisionLog(DecisionLog(url, spool_dir=spool), max_transaction=50)
    writer.register_policy(policy)
    caplog.set_level(logging.WARNING, logger="moderation.storage")
    for start in range(0, 200, 10):
        writer.write(records[start : start + 10])
    writer.flush()
    blocker = sqlite3.connect(path, timeout=0.05, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the outage: nobody else can write
    for start in range(200, 400, 10):
        writer.write(records[start : start + 10])
    writer.flush()
    blocker.execute("ROLLBACK")
    blocker.close()
    for start in range(400, 600, 10):
        writer.write(records[start : start + 10])
    writer.close()
    assert not writer.failed
    assert any("spooling" in r.getMessage() for r in caplog.records)
    stored = _ids(url) | _spooled_ids(spool)
    assert stored == {r.id for r in records}  # each one in the database or in the spool
    with DecisionLog(url, spool_dir=spool) as log:
        log.replay()
    assert _count(url, policy.digest) == (600, 600)


@pytest.mark.postgres
def test_many_writes_to_postgresql_land_exactly_once(tmp_path, pg_server):
    from moderation.storage import upgrade
    from tests.pg import temporary_pg_database

    with temporary_pg_database(pg_server, prefix="moderation_log_writer") as url:
        upgrade(url)
        policy = example_policy()
        records = example_decisions(3000, policy, dim=768, review_every=9)
        with BackgroundDecisionLog(DecisionLog(url, spool_dir=tmp_path / "spool")) as writer:
            writer.register_policy(policy)
            for start in range(0, 3000, 8):
                writer.write(records[start : start + 8])
        assert _count(url, policy.digest) == (3000, 3000)
        from moderation.storage import db

        db.dispose(url)


def test_moderator_logs_through_the_background_writer(tmp_path, tiny_checker_dir):
    import torch

    from moderation.bench.models import policy_from_checker
    from moderation.encoder import ClipEncoder
    from moderation.engine import Moderator
    from moderation.synthetic import build_safety_checker

    url = f"sqlite:///{tmp_path / 'log.db'}"
    policy = policy_from_checker(build_safety_checker(), str(tiny_checker_dir))
    encoder = ClipEncoder.from_pretrained(tiny_checker_dir, device="cpu")
    writer = BackgroundDecisionLog.open(
        url, spool_dir=tmp_path / "spool", held_dir=tmp_path / "held"
    )
    ids = []
    with Moderator(policy, encoder, log=writer) as moderator:
        for seed in range(3):
            images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
            ids += [d.decision_id for d in moderator.moderate(images).decisions]
    assert _ids(url) == set(ids) and len(ids) == 12
