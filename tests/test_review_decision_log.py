"""Decisions written by the storage DecisionLog flow through the review queue to `release`."""

from __future__ import annotations

import pytest

from moderation.bench.records import CONCEPTS, example_decisions, example_policy
from moderation.review import ReviewError
from moderation.review.queue import ReviewQueue
from moderation.storage.log import DecisionLog
from tests.review_factory import PG_URL, pg_database, sqlite_url


def release(log, decision_id):
    """The held original of a decision, through the review queue's release rules."""
    return ReviewQueue(log.url).release(decision_id, log.held)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
        return
    if not PG_URL:
        pytest.skip("MODERATION_TEST_PG_URL is not set")
    with pg_database("review_log") as url:
        yield url


def test_logged_decisions_are_reviewed_and_released(db_url, tmp_path):
    policy = example_policy()
    records = example_decisions(8, policy, dim=8, review_every=2)  # 0, 2, 4, 6 need review
    records[0].held_image = b"original 0"
    records[2].held_image = b"original 2"
    with DecisionLog(db_url, spool_dir=tmp_path / "spool", held_dir=tmp_path / "held") as log:
        log.register_policy(policy)
        log.write(records)
        queue = ReviewQueue(db_url)
        items = {i.decision_id: i for i in queue.list()}
        assert set(items) == {records[i].id for i in (0, 2, 4, 6)}
        first, second = items[records[0].id].id, items[records[2].id].id
        assert items[records[0].id].priority == 1, "special-care escalations come first"

        shown = queue.show(first)
        assert shown["decision"]["held_path"] and shown["decision"]["meta"]["prompt"] == "prompt 0"
        assert shown["decision"]["held_file"].endswith(shown["decision"]["held_path"])
        assert [c["name"] for c in shown["concepts"]] == list(CONCEPTS)
        assert [c["cosine"] for c in shown["concepts"]] == pytest.approx(
            records[0].cosines.tolist()
        )
        assert [c["score"] for c in shown["concepts"]] == pytest.approx(records[0].scores.tolist())
        assert shown["events"][0]["event"] == "created"

        with pytest.raises(ReviewError, match="still awaiting review"):
            release(log, records[0].id)
        claims = {c.item_id: c for c in queue.claim("alice", 4)}
        queue.approve(first, "alice", token=claims[first].token)
        queue.reject(second, "alice", reason="weapon", token=claims[second].token)
        assert release(log, records[0].id) == b"original 0"
        with pytest.raises(ReviewError, match="was rejected by alice: weapon"):
            release(log, records[2].id)

        # An appeal puts the newest item back in the queue: the original is held again.
        queue.reopen(first, "bob", reason="appeal")
        with pytest.raises(ReviewError, match="still awaiting review"):
            release(log, records[0].id)
        assert queue.stats()["queue"] == {"pending": 1, "claimed": 2, "approved": 1, "rejected": 1}
