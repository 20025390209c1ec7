"""Time the review desk's item page (server side) with a large decision log.

    .venv/bin/python scripts/bench_desk.py                 # 100,000 decisions, SQLite
    .venv/bin/python scripts/bench_desk.py --db postgresql+psycopg://postgres@127.0.0.1:5432/test

Writes N synthetic decisions (every 10th needs review; half of those already decided), logs a
reviewer in, claims an item and requests its page R times in-process (FastAPI's TestClient: the
app's own time, no network). A PostgreSQL URL names a server: a scratch database is created
on it and dropped afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from argon2 import PasswordHasher
from fastapi.testclient import TestClient

from moderation.bench.records import example_decisions, example_policy
from moderation.bench.scratch import temporary_pg_database
from moderation.desk import accounts
from moderation.desk.accounts import add_user
from moderation.desk.app import DeskSettings, create_app
from moderation.review.queue import ReviewQueue
from moderation.storage import DecisionLog, db, upgrade
from moderation.storage.schema import get_engine

PASSWORD = "benchmark password"


def fill(url: str, n: int, folder: Path) -> None:
    policy = example_policy("bench")
    with DecisionLog(url, spool_dir=folder / "spool", held_dir=folder / "held") as log:
        log.register_policy(policy)
        for start in range(0, n, 10_000):
            batch = example_decisions(
                min(10_000, n - start), policy, dim=32, seed=start, review_every=10
            )
            log.write(batch)
    queue = ReviewQueue(url)
    pending = [i.id for i in queue.list(status="pending", limit=10_000)]
    for item_id in pending[: len(pending) // 2]:
        queue.approve(item_id, "earlier-reviewer")


def measure(url: str, n: int, repeats: int, folder: Path) -> None:
    t0 = time.perf_counter()
    fill(url, n, folder)
    print(f"wrote {n:,} decisions in {time.perf_counter() - t0:.1f} s")
    accounts.HASHER = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    add_user(get_engine(url), "alice", "reviewer", PASSWORD)
    app = create_app(DeskSettings(db_url=url, held_dir=folder / "held", webhooks=False))
    client = TestClient(app, follow_redirects=False)
    page = client.get("/login").text
    csrf = page.split('name="csrf" value="')[1].split('"')[0]
    client.post("/login", data={"name": "alice", "password": PASSWORD, "csrf": csrf})
    item = client.get("/next").headers["location"]
    assert item.startswith("/items/"), item
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        response = client.get(item)
        times.append((time.perf_counter() - t) * 1000)
        assert response.status_code == 200
    queue_times = []
    for _ in range(max(5, repeats // 5)):
        t = time.perf_counter()
        assert client.get("/").status_code == 200
        queue_times.append((time.perf_counter() - t) * 1000)
    times.sort()
    print(
        f"item page {item}: median {statistics.median(times):.1f} ms, "
        f"p95 {times[int(0.95 * (len(times) - 1))]:.1f} ms, max {times[-1]:.1f} ms "
        f"({repeats} requests); queue page median {statistics.median(queue_times):.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", help="PostgreSQL server URL (default: a temporary SQLite file)")
    parser.add_argument("-n", type=int, default=100_000, help="decisions in the log")
    parser.add_argument("--repeats", type=int, default=50, help="item page requests timed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-desk-") as tmp:
        folder = Path(tmp)
        with contextlib.ExitStack() as stack:
            if args.db:
                url = stack.enter_context(temporary_pg_database(args.db, "bench_desk"))
                upgrade(url)
            else:
                url = f"sqlite:///{folder / 'desk.db'}"
            try:
                measure(url, args.n, args.repeats, folder)
            finally:
                db.dispose(url)


if __name__ == "__main__":
    main()
