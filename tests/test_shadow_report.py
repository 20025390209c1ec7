"""`moderation policy shadow-report` over shadow decisions in the stored form of the contract
(`shadow_of` = the live id, the candidate's digest, no embedding), on SQLite and PostgreSQL.

The live decisions are the engine's, logged without embeddings (store_embeddings=False); the
shadow rows are the candidate's decisions on the same images, written as DecisionRecords through
DecisionLog.write (what the engine's shadow writer stores)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from click.testing import CliRunner

from moderation.cli import main
from moderation.engine import Moderator
from moderation.lifecycle.backtest import load_candidate
from moderation.review.queue import ReviewQueue
from moderation.storage.log import DecisionLog
from moderation.storage.records import policy_record, record_of
from tests.backtest_factory import FIRST, POLICY, THRESHOLD_MOVED, moderate, write_policy


@pytest.fixture
def shadowed(tmp_path, tiny_clip_dir, db_url):
    live_path = write_policy(tmp_path / "policies", tiny_clip_dir, POLICY, "bt.yaml")
    moved = write_policy(tmp_path / "policies", tiny_clip_dir, THRESHOLD_MOVED, "moved.yaml")
    live, candidate = load_candidate(live_path), load_candidate(moved)
    with DecisionLog(db_url, spool_dir=tmp_path / "spool", held_dir=tmp_path / "held") as log:
        decisions = moderate(Moderator(live, log=log, store_embeddings=False), FIRST)
        decisions += Moderator(live, log=log).fail(["cannot decode image"])
        log.flush()
        shadows = moderate(Moderator(candidate), FIRST)
        shadows += Moderator(candidate).fail(["cannot decode image"])
        log.register_policy(policy_record(candidate))
        records = []
        for d, s in zip(decisions, shadows, strict=True):
            s.shadow_of, s.created_at, s.metadata = d.decision_id, d.created_at, d.metadata
            record = record_of(s)
            record.embedding, record.needs_review = None, False  # never queued, never stored
            records.append(record)
        log.write(records)
        assert not log.spool.has_pending()
    queue = ReviewQueue(db_url)
    items = {i.decision_id: i.id for i in queue.list(limit=100)}
    assert {s.decision_id for s in shadows}.isdisjoint(items)
    queue.reject(items[decisions[1].decision_id], "alice", reason="shows nudity")
    queue.approve(items[decisions[8].decision_id], "alice")
    return moved, candidate, decisions, shadows


def report(*args: str, code: int = 0):
    result = CliRunner().invoke(main, ["policy", "shadow-report", *args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def test_the_report_compares_live_and_shadow_decisions(shadowed, db_url):
    moved, candidate, decisions, shadows = shadowed
    data = json.loads(report(str(moved), "--db", db_url, "--json").stdout)
    assert data["candidate"]["digest"] == candidate.digest
    assert (data["decisions"], data["scored"], data["skipped"]) == (11, 10, {"error_verdict": 1})
    expected = Counter(
        f"{d.action}->{s.action}"
        for d, s in zip(decisions, shadows, strict=True)
        if d.verdict != "error"
    )
    assert data["transitions"] == dict(expected)
    # what backtest says of the same images (tests/backtest_factory.py, images 0-9)
    assert data["transitions"] == {
        "blur->review": 2, "review->allow": 2, "blur->allow": 1, "blur->blur": 2,
        "allow->allow": 1, "blackout->blackout": 1, "review->review": 1,
    }  # fmt: skip
    assert data["changed"] == 5

    # examples are the oldest: ids are time-ordered, one batch's decisions share a time
    assert data["examples"]["blur->review"] == [decisions[4].decision_id, decisions[8].decision_id]
    assert data["concepts"] == {
        "nudity": {"before": 5, "after": 2},
        "gore": {"before": 1, "after": 1},
    }
    assert data["special_care"] == {"minor": {"before": 2, "after": 2}}
    assert data["reviewed"] == {
        # the approved blur is a review (not a flag) for the candidate: no longer flagged
        "approved": {"total": 1, "now_flagged": 0, "was_flagged": 1},
        "rejected": {"total": 1, "now_allowed": 1, "was_allowed": 0},
    }
    # a logged policy's digest prefix names the same candidate, without its file or model
    by_digest = json.loads(report(candidate.digest[:12], "--db", db_url, "--json").stdout)
    assert by_digest["transitions"] == data["transitions"]
    limited = json.loads(report(candidate.digest, "--db", db_url, "--json", "--limit", "3").stdout)
    assert limited["decisions"] == 3
    assert limited["transitions"] == {"review->allow": 2, "allow->allow": 1}
    later = json.loads(report(str(moved), "--db", db_url, "--json", "--since", "1h").stdout)
    assert later["decisions"] == 11
    none = json.loads(report(str(moved), "--db", db_url, "--json", "--until", "2000-01-01").stdout)
    assert (none["decisions"], none["transitions"]) == (0, {})
    text = report(str(moved), "--db", db_url).stdout
    assert "Shadow report of bt v2" in text and "changed action: 5 of 10" in text


def test_backtest_reads_no_shadow_row(shadowed, db_url):
    moved, *_ = shadowed
    result = CliRunner().invoke(main, ["policy", "backtest", str(moved), "--db", db_url, "--json"])
    data = json.loads(result.stdout)
    # 11 live decisions, none with an embedding (the error has none either)
    assert data["decisions"] == 11
    assert data["skipped"] == {"error_verdict": 1, "no_embedding": 10}


def test_a_candidate_never_shadowed_reports_zeros(shadowed, db_url, tmp_path):
    _, candidate, *_ = shadowed
    artifact = tmp_path / "other.compiled.safetensors"
    import dataclasses

    dataclasses.replace(candidate, version="9", digest="").save(artifact)
    data = json.loads(report(str(artifact), "--db", db_url, "--json").stdout)
    assert (data["decisions"], data["changed"], data["transitions"]) == (0, 0, {})
    assert data["notes"] == ["no shadow decision of this candidate was logged"]


def test_bad_input_is_one_line(shadowed, db_url, tmp_path):
    for args, message in [
        (["ffffffff", "--db", db_url], "'ffffffff' is not a policy file, and no logged policy"),
        (["bt", "--db", db_url], "matches 2 logged policies"),
        (["bt", "--db", db_url, "--since", "never"], 'invalid since "never"'),
        (["bt", "--db", f"sqlite:///{tmp_path / 'none.db'}"], "no database at"),
    ]:
        result = report(*args, code=1)
        assert message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
