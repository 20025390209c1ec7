"""Eight claim worker processes drain one queue: every item is claimed exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from moderation.review.queue import ReviewQueue
from moderation.storage.models import ReviewEvent, ReviewItem
from tests.review_factory import seed, sqlite_url

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "review_factory.py"
WORKERS = 8
ITEMS = 500
BATCH = 5  # small batches: many short claim transactions racing each other


def drain(url: str) -> tuple[list[list[int]], float]:
    """Start the workers, release them together, return each one's claimed ids and the wall time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), url, f"reviewer-{i}", str(BATCH)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(WORKERS)
    ]
    try:
        for proc in procs:
            line = proc.stdout.readline().strip()
            assert line == "ready", proc.stderr.read()
        start = time.perf_counter()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err
            results.append(json.loads(out))
        return results, time.perf_counter() - start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def check_drained(url: str, item_ids: list[int], results: list[list[int]]) -> None:
    claimed = [i for ids in results for i in ids]
    assert len(claimed) == len(set(claimed)), "an item was claimed twice"
    assert sorted(claimed) == sorted(item_ids), "an item was missed"
    owner = {i: f"reviewer-{w}" for w, ids in enumerate(results) for i in ids}
    engine = ReviewQueue(url).engine
    with engine.connect() as conn:
        rows = conn.execute(select(ReviewItem.id, ReviewItem.status, ReviewItem.reviewer)).all()
        per_event = dict(
            conn.execute(select(ReviewEvent.event, func.count()).group_by(ReviewEvent.event)).all()
        )
        claimers = dict(
            conn.execute(
                select(ReviewEvent.item_id, ReviewEvent.actor).where(ReviewEvent.event == "claimed")
            ).all()
        )
    assert {(r.id, r.status, r.reviewer) for r in rows} == {
        (i, "approved", owner[i]) for i in item_ids
    }
    assert per_event == {"created": ITEMS, "claimed": ITEMS, "approved": ITEMS}
    assert claimers == owner


@pytest.mark.slow
def test_concurrent_claims_sqlite_wal(tmp_path):
    url = sqlite_url(tmp_path)
    queue = ReviewQueue(url)
    with queue.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    seeded = seed(url, ITEMS, step_s=0.001)
    results, seconds = drain(url)
    print(
        f"\nsqlite: {WORKERS} processes drained {ITEMS} items in {seconds:.2f}s, {[len(r) for r in results]}"
    )
    check_drained(url, seeded.item_ids, results)


@pytest.mark.slow
@pytest.mark.postgres
def test_concurrent_claims_postgres(pg_server):
    from moderation.storage import upgrade
    from tests.pg import temporary_pg_database

    with temporary_pg_database(pg_server, "review_concurrency") as url:
        upgrade(url)
        seeded = seed(url, ITEMS, step_s=0.001)
        results, seconds = drain(url)
        print(
            f"\npostgres: {WORKERS} processes drained {ITEMS} items in {seconds:.2f}s, {[len(r) for r in results]}"
        )
        check_drained(url, seeded.item_ids, results)
