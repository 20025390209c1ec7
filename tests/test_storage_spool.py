"""Spool: checksummed records, torn tails cut on open, live files left alone, SIGKILL loses nothing."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from moderation.storage import DecisionLog, DecisionRow, Spool, upgrade
from moderation.storage import db as storage_db
from moderation.storage.spool_format import HEADER
from tests.pg import temporary_pg_database

REPO = Path(__file__).resolve().parents[1]
DOWN_PG = "postgresql+psycopg://postgres@127.0.0.1:1/x"


def write_records(folder: Path, n: int) -> Path:
    spool = Spool(folder)
    for i in range(n):
        spool.append("decisions", {"rows": [], "reviews": [], "n": i})
    path = spool.own_path
    spool.close()
    return path


def payloads(folder: Path) -> list[int]:
    spool = Spool(folder)
    try:
        return [p["n"] for path in spool.claim() for p in spool.entries(path, "decisions")]
    finally:
        spool.release_all()


def test_records_survive_and_files_are_private(tmp_path):
    path = write_records(tmp_path / "spool", 3)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert payloads(tmp_path / "spool") == [0, 1, 2]


@pytest.mark.parametrize("cut", [1, HEADER.size - 1, HEADER.size + 3])
def test_torn_last_record_is_cut_and_reported(tmp_path, cut):
    path = write_records(tmp_path, 3)
    size = path.stat().st_size
    record = (size) // 3
    os.truncate(path, size - record + cut)  # a crash part-way through the third record
    spool = Spool(tmp_path)
    reports = spool.recover()
    assert len(reports) == 1 and f"discarded {cut} bytes of a torn last record" in reports[0]
    assert path.stat().st_size == size - record
    assert payloads(tmp_path) == [0, 1]
    assert list(tmp_path.glob("*.corrupt-*")) == []


def test_zero_filled_tail_is_torn(tmp_path):
    path = write_records(tmp_path, 2)
    with path.open("ab") as f:
        f.write(b"\0" * 4096)  # what a power cut can leave after the file grew
    assert "torn last record" in Spool(tmp_path).recover()[0]
    assert payloads(tmp_path) == [0, 1]


def test_corruption_mid_file_is_kept_aside_and_the_records_after_it_survive(tmp_path):
    path = write_records(tmp_path, 3)
    data = bytearray(path.read_bytes())
    first = HEADER.size + HEADER.unpack(data[: HEADER.size])[2]
    data[HEADER.size + 2] ^= 0xFF  # flip a payload byte of the first record
    path.write_bytes(bytes(data))
    reports = Spool(tmp_path).recover()
    assert reports == [
        f"{path}: skipped {first} bytes of corrupt records (copied to {path.name}.corrupt-0) "
        "at offset 0; the records after them are kept"
    ]
    (kept,) = tmp_path.glob("*.corrupt-0")
    assert kept.read_bytes() == bytes(data[:first])
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert payloads(tmp_path) == [1, 2]
    assert Spool(tmp_path).recover() == [], "set aside once, not on every replay"


@pytest.mark.parametrize("damage", ["header", "length", "junk between"])
def test_scan_resynchronises_after_any_damaged_record(tmp_path, damage):
    path = write_records(tmp_path, 4)
    data = bytearray(path.read_bytes())
    size = HEADER.size + HEADER.unpack(data[: HEADER.size])[2]
    second = slice(size, 2 * size)
    if damage == "header":
        data[second.start] ^= 0xFF  # the magic of record 1
    elif damage == "length":
        data[second.start + 5 : second.start + 9] = (size * 3).to_bytes(4, "little")
    else:
        data[second.start : second.start] = b"MSPL\x02" + os.urandom(200)
    path.write_bytes(bytes(data))
    Spool(tmp_path).recover()
    expected = [0, 1, 2, 3] if damage == "junk between" else [0, 2, 3]
    assert payloads(tmp_path) == expected


def test_a_live_writers_file_is_not_claimed(tmp_path):
    live = Spool(tmp_path)
    live.append("decisions", {"rows": [], "reviews": [], "n": 1})
    path = live.own_path
    other = Spool(tmp_path)
    assert other.claim() == []
    assert other.has_pending()
    live.close()  # the writer exits: its file is now up for replay
    assert other.claim() == [path]
    other.release_all()


CHILD = """
import sys
from moderation.storage import DecisionLog
from moderation.bench.records import example_decisions, example_policy
url, spool, held = sys.argv[1:4]
log = DecisionLog(url, spool_dir=spool, held_dir=held)
policy = example_policy()
log.register_policy(policy)
for k in range(100000):
    records = example_decisions(50, policy, seed=k, dim=64, review_every=7)
    log.write(records)
    print(" ".join(r.id for r in records), flush=True)
"""


@pytest.fixture(params=["down", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def kill_urls(request, tmp_path):
    """(URL the child writes to, URL the survivors are read from)."""
    sqlite_url = f"sqlite:///{tmp_path / 'kill.db'}"
    if request.param == "down":
        yield DOWN_PG, sqlite_url
    elif request.param == "sqlite":
        yield sqlite_url, sqlite_url
    else:
        with temporary_pg_database(request.getfixturevalue("pg_server")) as url:
            upgrade(url)
            yield url, url
        return
    storage_db.dispose(sqlite_url)


def test_sigkill_while_writing_loses_nothing(tmp_path, kill_urls):
    child_url, url = kill_urls
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, child_url, str(tmp_path / "spool"), str(tmp_path / "held")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    reported: set[str] = set()
    try:
        for _ in range(rng.randint(3, 20)):
            line = child.stdout.readline()
            assert line, f"child died early (exit {child.poll()})"
            reported.update(line.split())
        time.sleep(rng.uniform(0, 0.05))  # land somewhere inside a later batch
    finally:
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate()
    for line in rest.splitlines():  # batches whose write returned before the kill
        if len(line.split()) == 50:
            reported.update(line.split())

    spooled = list((tmp_path / "spool").glob("*.spool"))
    if child_url == DOWN_PG:
        # Also leave what a kill inside os.write would: the first half of one more record.
        (path,) = spooled
        data = path.read_bytes()
        length = HEADER.unpack(data[: HEADER.size])[2]
        with path.open("ab") as f:
            f.write(data[: (HEADER.size + length) // 2])

    with DecisionLog(url, spool_dir=tmp_path / "spool") as log:
        assert len(log.spool.discarded) == (1 if child_url == DOWN_PG else 0)
        log.replay(into_other_database=child_url != url)
        with storage_db.engine_for(url).connect() as conn:
            stored = set(conn.execute(select(DecisionRow.id)).scalars())
    missing = reported - stored
    assert not missing, f"seed {seed}: {len(missing)} reported decisions lost"
    assert list((tmp_path / "spool").glob("*.spool")) == []
