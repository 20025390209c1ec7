"""Replay: a record the database refuses is quarantined (named, kept), not a blocker (issue 8,
item 9); a spool is tied to the database it was written for (item 10)."""

from __future__ import annotations

import json
import os
import zlib

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from moderation.bench.records import example_decisions, example_policy
from moderation.cli import main
from moderation.storage import DecisionLog, DecisionRow, Spool, upgrade
from moderation.storage import db as storage_db
from moderation.storage.errors import OtherDatabaseError
from moderation.storage.spool_format import HEADER, MAGIC, scan
from tests.pg import pg_database_later, pg_test_url

DOWN_PG = "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/x"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def outage(request, tmp_path):
    """(URL of a database that is unreachable now, a function that brings it up), per backend."""
    if request.param == "sqlite":
        folder = tmp_path / "later"
        url = f"sqlite:///{folder / 'log.db'}"
        yield url, folder.mkdir
        storage_db.dispose(url)
    else:
        server = pg_test_url()
        if server is None:
            pytest.skip("MODERATION_TEST_PG_URL is not set")
        with pg_database_later(server) as (url, create):
            yield url, create


def stored_ids(url: str) -> set[str]:
    with storage_db.engine_for(url).connect() as conn:
        return set(conn.execute(select(DecisionRow.id)).scalars())


def file_records(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(scan(fd))
    finally:
        os.close(fd)


def spool_while_down(url, spool, batches, policies=()):
    """Write batches of records while `url` is down; returns the one spool file."""
    with DecisionLog(url, spool_dir=spool) as down:
        for policy in policies:
            down.register_policy(policy)
        for batch in batches:
            down.write(batch)
    (path,) = spool.glob("*.spool")
    return path


def raw_record(kind: int, body: bytes) -> bytes:
    """A record whose checksum is right whatever its payload."""
    return HEADER.pack(MAGIC, kind, len(body), zlib.crc32(body, zlib.crc32(bytes([kind])))) + body


# -- item 9 ------------------------------------------------------------------------------------


def test_one_refused_decision_is_quarantined_and_every_other_one_replayed(outage, tmp_path):
    url, bring_up = outage
    spool = tmp_path / "spool"
    policy = example_policy()
    first, middle, last = (example_decisions(4, policy, seed=s) for s in (1, 2, 3))
    middle[1].policy_digest = "f" * 64  # refused by the database: no such policy
    path = spool_while_down(url, spool, [first, middle, last], policies=[policy])
    bring_up()
    with DecisionLog(url, spool_dir=spool) as log:
        assert log.replay() == 11
        (report,) = log.quarantined
        assert log.counts.quarantined == 1
    kept = spool / "quarantine" / path.name
    assert report.startswith(
        f"{path}: quarantined 1 decision(s) the database refused ({middle[1].id}): "
    )
    assert report.endswith(f"; kept in {kept}")
    every = {r.id for r in first + middle + last}
    assert stored_ids(url) == every - {middle[1].id}
    assert not path.exists(), "replayed and quarantined: the file is done"
    # The quarantine is a spool file of its own (target, policy, the refused decision, why).
    records = file_records(kept)
    assert [r.kind for r in records] == ["target", "policy", "decisions"]
    payload = records[2].payload()
    assert [row["id"] for row in payload["rows"]] == [middle[1].id]
    assert "FOREIGN KEY" in payload["refused"][0] or "foreign key" in payload["refused"][0]
    assert os.stat(kept).st_mode & 0o777 == 0o600
    with DecisionLog(url, spool_dir=spool) as log:
        assert log.replay() == 0 and log.quarantined == []  # no blocker left, nothing repeated


def test_a_record_with_a_valid_checksum_but_bad_contents_is_quarantined(tmp_path):
    url = f"sqlite:///{tmp_path / 'later' / 'x.db'}"
    spool = tmp_path / "spool"
    policy = example_policy()
    good = example_decisions(3, policy, seed=4)
    path = spool_while_down(url, spool, [good[:1]], policies=[policy])
    bad = {
        b"{not json": "its payload is not JSON (Expecting property name enclosed in double "
        "quotes: line 1 column 2 (char 1))",
        b"[1, 2]": "its payload is a JSON list, not an object",
        b'{"rows": [{"id": "x"}], "reviews": [null]}': "its row 0 is not a complete decisions row",
        b"\xff\xfe": "its payload is not JSON ('utf-8' codec can't decode byte 0xff in position 0: "
        "invalid start byte)",
    }
    offsets = []
    with path.open("ab") as f:
        for body in bad:
            offsets.append(f.tell())
            f.write(raw_record(2, body))
    with DecisionLog(url, spool_dir=spool) as later:  # still down: writes a file of its own
        later.register_policy(policy)
        later.write(good[1:])
    (tmp_path / "later").mkdir()
    result = CliRunner().invoke(
        main, ["db", "replay", "--db", url, "--spool", str(spool)], catch_exceptions=False
    )
    assert result.exit_code == 1, result.output  # decisions wait in quarantine (issue 15 item 4)
    kept = spool / "quarantine" / path.name
    *warnings, error = result.stderr.splitlines()
    assert error.startswith("Error: 1 decisions in 1 file(s) and 3 unreadable record(s) wait in")
    assert warnings == [
        f"warning: {path}: quarantined the unreadable decisions record at offset {offset}: "
        f"{why}; kept in {kept}"
        for offset, why in zip(offsets, bad.values(), strict=True)
    ]
    assert result.stdout == f"replayed 3 decisions from {spool}\n"
    assert stored_ids(url) == {r.id for r in good}
    assert [r.body for r in file_records(kept) if r.kind == "decisions"] == list(bad)


@pytest.mark.postgres
def test_a_nul_that_postgresql_refuses_quarantines_only_its_own_decision(tmp_path):
    server = pg_test_url()
    if server is None:
        pytest.skip("MODERATION_TEST_PG_URL is not set")
    policy = example_policy()
    records = example_decisions(5, policy, seed=9)
    records[3].meta = {"prompt": "a\x00b"}  # a caller that bypassed the engine's check
    with pg_database_later(server) as (url, bring_up):
        path = spool_while_down(url, tmp_path / "spool", [records], policies=[policy])
        bring_up()
        with DecisionLog(url, spool_dir=tmp_path / "spool") as log:
            assert log.replay() == 4
            (report,) = log.quarantined
        assert f"quarantined 1 decision(s) the database refused ({records[3].id})" in report
        assert stored_ids(url) == {r.id for r in records} - {records[3].id}
        assert not path.exists()


# -- item 10 -----------------------------------------------------------------------------------


def test_the_spool_names_its_database_with_the_password_masked(tmp_path):
    policy = example_policy()
    path = spool_while_down(DOWN_PG, tmp_path, [example_decisions(1, policy)], policies=[policy])
    target = file_records(path)[0]
    assert target.kind == "target"
    assert target.payload() == {
        "url": "postgresql+psycopg://postgres:***@127.0.0.1:1/x",
        "database": "postgresql://127.0.0.1:1/x",
    }
    assert b"s3cret" not in path.read_bytes()


def test_replay_into_another_database_is_refused_unless_asked(tmp_path):
    spool = tmp_path / "spool"
    policy = example_policy()
    records = example_decisions(5, policy)
    path = spool_while_down(DOWN_PG, spool, [records], policies=[policy])
    url = f"sqlite:///{tmp_path / 'other.db'}"
    upgrade(url)
    with DecisionLog(url, spool_dir=spool) as log:
        with pytest.raises(OtherDatabaseError) as caught:
            log.replay()
        assert str(caught.value) == (
            f"replayed 0 decisions into {url}, and left 1 spool file(s) alone: {path}: is meant "
            "for postgresql+psycopg://postgres:***@127.0.0.1:1/x (replay them with --db set to "
            "their database, or pass --into-other-database to replay them here)"
        )
        assert path.exists() and stored_ids(url) == set()
        # New decisions for this database are not blocked, nor mixed up with the others.
        log.register_policy(policy)
        log.write(example_decisions(2, policy, seed=8))
        assert path.exists() and len(stored_ids(url)) == 2
        assert log.replay(into_other_database=True) == 5
    assert stored_ids(url) >= {r.id for r in records} and not path.exists()


def test_the_same_database_under_its_own_url_replays_automatically(tmp_path):
    later = tmp_path / "later"
    url = f"sqlite:///{later / 'x.db'}"
    spool = tmp_path / "spool"
    policy = example_policy()
    records = example_decisions(3, policy)
    spool_while_down(url, spool, [records], policies=[policy])
    later.mkdir()
    relative = os.path.relpath(later / "x.db")  # another spelling of the same file
    with DecisionLog(f"sqlite:///{relative}", spool_dir=spool) as log:
        log.write(example_decisions(1, policy, seed=5))
        assert log.counts.replayed == 3
    assert list(spool.glob("*.spool")) == []


def test_a_spool_file_of_an_earlier_version_says_it_does_not_know_its_database(tmp_path):
    """Files written before targets existed (no `target` record, rows without the columns added
    since) still read, but need the flag."""
    spool = tmp_path / "spool"
    spool.mkdir()
    policy = example_policy()
    records = example_decisions(2, policy)
    from moderation.storage.records import decision_row, policy_row, review_of, row_to_json

    rows = [row_to_json(decision_row(r, None)) for r in records]
    for row in rows:  # columns that migrations 0002-0003 added did not exist then
        for name in ("views", "concept_views", "special_views", "shadow_of"):
            del row[name]
    path = spool / "20240101T000000-host-1-abcd.spool"
    with path.open("wb") as f:
        for kind, payload in (
            (1, policy_row(policy)),
            (
                2,
                {
                    "rows": rows,
                    "reviews": [review_of(r) for r in records],
                },
            ),
        ):
            f.write(raw_record(kind, json.dumps(payload, separators=(",", ":")).encode()))
    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade(url)
    result = CliRunner().invoke(main, ["db", "replay", "--db", url, "--spool", str(spool)])
    assert result.exit_code == 1
    assert (
        f"left 1 spool file(s) alone: {path}: does not say which database it is for "
        "(an earlier version wrote it)"
    ) in result.output
    result = CliRunner().invoke(
        main, ["db", "replay", "--db", url, "--spool", str(spool), "--into-other-database"]
    )
    assert result.output == f"replayed 2 decisions from {spool}\n"
    assert stored_ids(url) == {r.id for r in records}


def test_an_automatic_replay_does_not_retry_another_databases_file_on_every_batch(tmp_path):
    spool = tmp_path / "spool"
    policy = example_policy()
    spool_while_down(DOWN_PG, spool, [example_decisions(2, policy)], policies=[policy])
    url = f"sqlite:///{tmp_path / 'x.db'}"
    with DecisionLog(url, spool_dir=spool) as log:
        log.register_policy(policy)
        log.write(example_decisions(1, policy, seed=1))
        claims = []
        real_claim = Spool.claim

        def counting_claim(self, skip=()):
            claims.append(sorted(skip))
            return real_claim(self, skip)

        Spool.claim = counting_claim
        try:
            for seed in range(2, 5):
                log.write(example_decisions(1, policy, seed=seed))
        finally:
            Spool.claim = real_claim
        assert claims == [], "the other database's file is known, and not claimed again"
    with storage_db.engine_for(url).connect() as conn:
        assert conn.execute(select(func.count()).select_from(DecisionRow)).scalar_one() == 4
