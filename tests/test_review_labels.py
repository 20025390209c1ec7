"""Review labels: `review reject/approve --concept`, what they store, show and audit, and 0004."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from moderation.cli import main
from moderation.review import ReviewError
from moderation.review.explain import decision_labels
from moderation.review.queue import ReviewQueue
from moderation.storage import db as storage_db
from moderation.storage import downgrade, upgrade
from moderation.storage.models import ReviewEvent, ReviewItem
from tests.calibration_factory import GORE, MINOR, NUDITY, Log, embedding, write_policy


@pytest.fixture
def logged(tmp_path, tiny_clip_dir, encoder, db_url):
    """Four reviewable decisions: nudity fired; gore fired with minor; a band near-miss; minor."""
    log = Log(write_policy(tmp_path / "p", tiny_clip_dir), encoder, db_url, tmp_path)
    decisions = log.decide(
        [
            embedding({NUDITY: 0.40}),
            embedding({GORE: 0.40, MINOR: 0.30}),
            embedding({GORE: 0.29}),  # 0.01 below gore's threshold: inside the 0.02 band
            embedding({MINOR: 0.30}),
        ]
    )
    assert [d.fired for d in decisions] == [("nudity",), ("gore",), (), ()]
    assert [d.special_hits for d in decisions] == [(), ("minor",), (), ("minor",)]
    queue = ReviewQueue(db_url)
    items = {i.decision_id: i.id for i in queue.list()}
    yield queue, [items[d.decision_id] for d in decisions], decisions
    log.close()


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def stored(queue: ReviewQueue, item_id: int) -> dict | None:
    with queue.engine.connect() as conn:
        return conn.execute(select(ReviewItem.labels).where(ReviewItem.id == item_id)).scalar_one()


def test_verdict_defaults(logged):
    queue, (nudity, gore, band, minor), _ = logged
    queue.reject(nudity, "alice", reason="nudity")
    queue.reject(gore, "alice", reason="gore")
    queue.reject(band, "alice", reason="near miss")
    queue.approve(minor, "alice")
    assert stored(queue, nudity) == {
        "shows": ["nudity"],
        "missed": [],
        "false_alarms": [],
        "explicit": False,
    }
    # Special-care hits count as shown with a rejection...
    assert stored(queue, gore)["shows"] == ["gore", "minor"]
    # ...a rejection where nothing fired names the near misses that sent it to review...
    assert stored(queue, band) == {
        "shows": ["gore"],
        "missed": ["gore"],
        "false_alarms": [],
        "explicit": False,
    }
    # ...and an approval keeps special-care hits shown: acceptable is not "no child in it".
    assert stored(queue, minor) == {
        "shows": ["minor"],
        "missed": [],
        "false_alarms": [],
        "explicit": False,
    }


def test_named_concepts_misses_and_false_alarms(logged):
    queue, (nudity, gore, band, minor), _ = logged
    queue.reject(nudity, "alice", reason="both", concepts=["gore", "nudity", "gore"])
    assert stored(queue, nudity) == {
        "shows": ["nudity", "gore"],
        "missed": ["gore"],
        "false_alarms": [],
        "explicit": True,
    }
    queue.approve(gore, "bob", concepts=[])
    assert stored(queue, gore) == {
        "shows": [],
        "missed": [],
        "false_alarms": ["gore", "minor"],
        "explicit": True,
    }
    with queue.engine.connect() as conn:
        details = conn.execute(
            select(ReviewEvent.details).where(
                ReviewEvent.item_id == gore, ReviewEvent.event == "approved"
            )
        ).scalar_one()
    assert details["labels"] == stored(queue, gore)  # the audit trail keeps them too


def test_unknown_concept_is_refused_and_nothing_changes(logged):
    queue, (nudity, *_), _ = logged
    message = (
        f"item {nudity}: unknown concept 'nudty'; policy calib has: nudity, gore; "
        "special care: minor"
    )
    with pytest.raises(ReviewError) as caught:
        queue.reject(nudity, "alice", reason="x", concepts=["nudty"])
    assert str(caught.value) == message
    assert queue.show(nudity)["item"]["status"] == "pending"
    assert stored(queue, nudity) is None
    with pytest.raises(ReviewError, match=rf"^item {nudity}: a concept name must be text, not 3$"):
        queue.reject(nudity, "alice", reason="x", concepts=[3])


def test_cli_concepts_show_and_errors(logged, db_url):
    queue, (nudity, gore, band, minor), _ = logged
    out = run("review", "reject", str(nudity), "--reviewer", "alice", "--reason", "r",
              "--concept", "gore", "--db", db_url)  # fmt: skip
    assert out.output == f"Rejected item {nudity}.\n"
    shown = json.loads(run("review", "show", str(nudity), "--json", "--db", db_url).output)
    assert shown["item"]["labels"] == {
        "shows": ["gore"],
        "missed": ["gore"],
        "false_alarms": ["nudity"],
        "explicit": True,
    }
    text = run("review", "show", str(nudity), "--db", db_url).output
    assert (
        "  labels: shows gore; missed gore; false alarms nudity (named by the reviewer)\n" in text
    )

    bad = run("review", "approve", str(gore), "--reviewer", "a", "--concept", "nope",
              "--db", db_url, code=1)  # fmt: skip
    assert bad.output == (
        f"Error: item {gore}: unknown concept 'nope'; policy calib has: nudity, gore; "
        "special care: minor\n"
    )
    both = run("review", "approve", str(gore), "--reviewer", "a", "--concept", "gore",
               "--no-concepts", "--db", db_url, code=2)  # fmt: skip
    assert "give --concept or --no-concepts, not both" in both.output
    run("review", "approve", str(gore), "--reviewer", "a", "--no-concepts", "--db", db_url)
    assert stored(queue, gore)["false_alarms"] == ["gore", "minor"]
    pending = json.loads(run("review", "show", str(band), "--json", "--db", db_url).output)
    assert pending["item"]["labels"] is None


def test_latest_verdict_wins_after_a_reopen(logged):
    queue, (nudity, *_), decisions = logged
    decision_id = decisions[0].decision_id
    with queue.engine.connect() as conn:
        assert decision_labels(conn, decision_id) is None  # never reviewed
    queue.reject(nudity, "alice", reason="nudity")
    with queue.engine.connect() as conn:
        assert decision_labels(conn, decision_id)["shows"] == ["nudity"]
    again = queue.reopen(nudity, "bob", reason="appeal")
    with queue.engine.connect() as conn:
        assert decision_labels(conn, decision_id) is None  # under appeal: no verdict stands
    queue.approve(again, "carol")
    with queue.engine.connect() as conn:
        labels = decision_labels(conn, decision_id)
    assert labels == {
        "item_id": again,
        "verdict": "approved",
        "reviewer": "carol",
        "shows": [],
        "missed": [],
        "false_alarms": ["nudity"],
        "explicit": False,
    }


def test_labels_survive_migrating_down_and_up(logged, db_url):
    """0004 down drops the labels; back up, a verdict without labels counts with its default."""
    queue, (nudity, gore, *_), decisions = logged
    queue.reject(nudity, "alice", reason="r", concepts=["gore"])
    queue.approve(gore, "alice")
    storage_db.dispose(db_url)
    downgrade(db_url, "0003")
    with storage_db.engine_for(db_url).connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, status FROM review_items ORDER BY id").all()
        columns = conn.exec_driver_sql("SELECT * FROM review_items").keys()
    assert (nudity, "rejected") in [tuple(r) for r in rows] and "labels" not in columns
    storage_db.dispose(db_url)
    upgrade(db_url)
    queue = ReviewQueue(db_url)
    assert stored(queue, nudity) is None
    shown = queue.show(nudity)["item"]["labels"]
    assert shown == {
        "shows": ["nudity"],
        "missed": [],
        "false_alarms": [],
        "explicit": False,
        "inferred": True,
    }
    with queue.engine.connect() as conn:
        assert decision_labels(conn, decisions[1].decision_id)["shows"] == ["minor"]
