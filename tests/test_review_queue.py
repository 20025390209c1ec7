"""Review queue service: claim order and leases, verdicts, tokens, reopen and the audit trail."""

from __future__ import annotations

import functools
import sqlite3
from contextlib import contextmanager
from datetime import timedelta

import pytest
from sqlalchemy import exc, select

import moderation.review.queue as review_module
from moderation.review.queue import ReviewQueue
from moderation.review.rules import ReviewError
from moderation.storage.models import ReviewEvent, ReviewItem
from tests.review_factory import (
    T0,
    Clock,
    decide,
    seed,
    sqlite_url,
    write,
)

LEASE = 60


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def queue(db_url, clock):
    return ReviewQueue(db_url, lease_seconds=LEASE, now=clock)


def events(queue: ReviewQueue, item_id: int | None = None) -> list[tuple]:
    """(item_id, actor, event, reason, details) in append order."""
    query = select(
        ReviewEvent.item_id,
        ReviewEvent.actor,
        ReviewEvent.event,
        ReviewEvent.reason,
        ReviewEvent.details,
    ).order_by(ReviewEvent.id)
    if item_id is not None:
        query = query.where(ReviewEvent.item_id == item_id)
    with queue.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(query)]


def item(queue: ReviewQueue, item_id: int):
    with queue.engine.connect() as conn:
        return conn.execute(select(ReviewItem.__table__).where(ReviewItem.id == item_id)).one()


def test_claim_takes_items_in_queue_order(queue):
    seed(queue.url, 6, rng_seed=1)
    seed(queue.url, 6, rng_seed=1)  # same scores and times: ties broken by id
    seed(queue.url, 6, rng_seed=1, start=T0.replace(hour=11))  # same scores, earlier
    with queue.engine.connect() as conn:
        rows = conn.execute(select(ReviewItem.__table__)).all()
    expected = [
        r.id for r in sorted(rows, key=lambda r: (-r.priority, -r.margin, r.created_at, r.id))
    ]
    assert len({r.priority for r in rows}) == 2, "the seed should mix special-care priorities"
    claimed = queue.claim("alice", 5) + queue.claim("bob", 100)
    assert [c.item_id for c in claimed] == expected
    assert queue.claim("carol", 3) == []


def test_claim_sets_lease_token_and_event(queue, clock):
    seeded = seed(queue.url, 3)
    (first,) = queue.claim("  alice ", 1)
    row = item(queue, first.item_id)
    assert (row.status, row.claim_owner, row.claim_token) == ("claimed", "alice", first.token)
    assert first.expires_at == clock() + timedelta(seconds=LEASE)
    assert row.claim_expires_at == first.expires_at
    assert first.decision_id in {d.decision_id for d in seeded.decisions}
    (second,) = queue.claim("bob", 1)
    assert second.item_id != first.item_id and second.token != first.token
    assert events(queue, first.item_id)[-1] == (
        first.item_id,
        "alice",
        "claimed",
        None,
        {"token": first.token, "expires_at": first.expires_at.isoformat(), "lease_seconds": LEASE},
    )


def test_expired_lease_is_taken_over_and_late_verdict_refused(queue, clock):
    seed(queue.url, 1)
    (alice,) = queue.claim("alice", 1)
    clock.advance(LEASE - 1)
    assert queue.claim("bob", 1) == [], "a live lease is not claimable"
    clock.advance(1)  # the lease ends exactly now
    (bob,) = queue.claim("bob", 1)
    assert bob.item_id == alice.item_id and bob.token != alice.token
    with pytest.raises(ReviewError, match=rf"^item {alice.item_id}: claimed by bob, not alice$"):
        queue.approve(alice.item_id, "alice", token=alice.token)
    with pytest.raises(ReviewError, match=rf"^item {alice.item_id}: claimed by bob, not alice$"):
        queue.reject(alice.item_id, "alice", reason="late", token=alice.token)
    queue.reject(bob.item_id, "bob", reason="gore", token=bob.token)
    history = [(actor, event) for _, actor, event, _, _ in events(queue, alice.item_id)]
    assert history == [
        ("system", "created"),
        ("alice", "claimed"),
        ("bob", "lease_expired"),
        ("bob", "claimed"),
        ("bob", "rejected"),
    ]
    expired = events(queue, alice.item_id)[2][4]
    assert expired == {"previous_owner": "alice", "expired_at": alice.expires_at.isoformat()}


def test_expired_lease_refuses_its_owner_until_claimed_again(queue, clock):
    seed(queue.url, 1)
    (claim,) = queue.claim("alice", 1)
    clock.advance(LEASE + 5)
    message = f"item {claim.item_id}: lease expired at 2024-05-01 12:01:00 UTC; claim it again"
    with pytest.raises(ReviewError, match=f"^{message}$"):
        queue.approve(claim.item_id, "alice", token=claim.token)
    with pytest.raises(ReviewError, match=f"^{message}$"):
        queue.approve(claim.item_id, "alice")  # the CLI form: no token
    message = (
        f"item {claim.item_id}: lease of alice expired at 2024-05-01 12:01:00 UTC; claim it first"
    )
    with pytest.raises(ReviewError, match=f"^{message}$"):
        queue.approve(claim.item_id, "bob")
    (again,) = queue.claim("alice", 1)
    assert again.item_id == claim.item_id
    # The stale token of the first claim no longer matches.
    with pytest.raises(ReviewError, match="token does not match the current claim"):
        queue.approve(claim.item_id, "alice", token=claim.token)
    queue.approve(claim.item_id, "alice", token=again.token)
    assert item(queue, claim.item_id).status == "approved"


def test_token_mismatch_refused(queue):
    seed(queue.url, 1)
    (claim,) = queue.claim("alice", 1)
    with pytest.raises(
        ReviewError,
        match=rf"^item {claim.item_id}: token does not match the current claim; "
        "use the token of your latest claim$",
    ):
        queue.reject(claim.item_id, "alice", reason="x", token="not-the-token")
    assert item(queue, claim.item_id).status == "claimed"
    queue.approve(claim.item_id, "alice")  # own live claim, no token: allowed
    assert item(queue, claim.item_id).status == "approved"


def test_foreign_live_claim_refused(queue):
    seed(queue.url, 1)
    (claim,) = queue.claim("bob", 1)
    with pytest.raises(ReviewError, match=rf"^item {claim.item_id}: claimed by bob, not alice$"):
        queue.approve(claim.item_id, "alice", token=claim.token)


@pytest.mark.parametrize("name", ["", "   ", None])
@pytest.mark.parametrize("action", ["claim", "approve", "reject", "reopen"])
def test_reviewer_name_required(queue, name, action):
    seeded = seed(queue.url, 1)
    item_id = seeded.item_ids[0]
    calls = {
        "claim": lambda: queue.claim(name, 1),
        "approve": lambda: queue.approve(item_id, name),
        "reject": lambda: queue.reject(item_id, name, reason="r"),
        "reopen": lambda: queue.reopen(item_id, name, reason="r"),
    }
    before = events(queue)
    with pytest.raises(ReviewError, match="^a reviewer name is required$"):
        calls[action]()
    assert events(queue) == before


@pytest.mark.parametrize("reason", ["", "  ", None])
def test_reject_and_reopen_need_a_reason(queue, reason):
    (item_id,) = seed(queue.url, 1).item_ids
    with pytest.raises(ReviewError, match="^a reason is required to reject an item$"):
        queue.reject(item_id, "alice", reason=reason)
    queue.approve(item_id, "alice")
    with pytest.raises(ReviewError, match="^a reason is required to reopen an item$"):
        queue.reopen(item_id, "alice", reason=reason)


def test_direct_verdict_on_pending_item(queue):
    first, second = seed(queue.url, 2).item_ids
    with pytest.raises(ReviewError, match=rf"^item {first}: is not claimed, so the token"):
        queue.approve(first, "alice", token="some-token")
    queue.approve(first, "alice", reason="fine")
    *head, details = events(queue, first)[-1]
    labels = details.pop("labels")
    assert (*head, details) == (first, "alice", "approved", "fine", {"direct": True, "token": None})
    assert labels == item(queue, first).labels  # the event records the verdict's labels
    with pytest.raises(
        ReviewError,
        match=rf"^item {first}: already approved by alice; reopen it to review it again$",
    ):
        queue.reject(first, "bob", reason="no")
    queue.reject(second, "bob", reason="gore")
    row = item(queue, second)
    assert (row.status, row.reviewer, row.reason, row.claim_token) == (
        "rejected",
        "bob",
        "gore",
        None,
    )


def test_unknown_item(queue):
    for call in (
        lambda: queue.approve(999, "alice"),
        lambda: queue.reject(999, "alice", reason="x"),
        lambda: queue.reopen(999, "alice", reason="x"),
        lambda: queue.show(999),
    ):
        with pytest.raises(ReviewError, match="^item 999: no such review item$"):
            call()


def test_reopen_creates_linked_item_and_keeps_old(queue, clock):
    (old,) = seed(queue.url, 1).item_ids
    with pytest.raises(ReviewError, match=rf"^item {old}: is pending; only approved or rejected"):
        queue.reopen(old, "carol", reason="appeal")
    queue.reject(old, "alice", reason="gore")
    clock.advance(10)
    new = queue.reopen(old, "carol", reason="user appeal")
    old_row, new_row = item(queue, old), item(queue, new)
    assert (old_row.status, old_row.reviewer, old_row.reason) == ("rejected", "alice", "gore")
    assert new_row.status == "pending" and new_row.reopened_from == old
    assert (new_row.decision_id, new_row.priority, new_row.margin) == (
        old_row.decision_id,
        old_row.priority,
        old_row.margin,
    )
    assert new_row.created_at == clock()
    assert events(queue, old)[-1] == (old, "carol", "reopened", "user appeal", {"new_item": new})
    assert events(queue, new) == [(new, "carol", "created", "user appeal", {"reopened_from": old})]
    with pytest.raises(
        ReviewError,
        match=rf"^item {old}: already reopened as item {new} \(pending\); reopen item {new} instead$",
    ):
        queue.reopen(old, "carol", reason="again")
    (claim,) = queue.claim("dave", 1)
    assert claim.item_id == new
    queue.approve(new, "dave", token=claim.token)
    assert queue.reopen(new, "erin", reason="second appeal") > new
    shown = queue.show(old)
    assert shown["item"]["reopened_as"] == [new]


def test_audit_events_are_append_only_and_complete(queue, clock):
    seed(queue.url, 3)
    log = [events(queue)]
    x, y, z = (c.item_id for c in queue.claim("alice", 3))
    log.append(events(queue))
    clock.advance(LEASE)
    steps = [
        lambda: queue.claim("bob", 1),  # takes x over
        lambda: queue.approve(x, "bob", reason="ok"),
        lambda: queue.claim("alice", 1),  # alice claims her own expired y again
        lambda: queue.reject(y, "alice", reason="weapons"),
        lambda: queue.reopen(y, "dave", reason="appeal"),
    ]
    for step in steps:
        step()
        log.append(events(queue))
    # Every snapshot starts with the previous one: nothing is ever changed or removed.
    for before, after in zip(log, log[1:], strict=False):
        assert after[: len(before)] == before
    kinds = [(e[0], e[1], e[2]) for e in log[-1]]
    new = kinds[-1][0]
    assert sorted(kinds[:3]) == [(i, "system", "created") for i in sorted((x, y, z))]
    assert kinds[3:] == [
        (x, "alice", "claimed"),
        (y, "alice", "claimed"),
        (z, "alice", "claimed"),
        (x, "bob", "lease_expired"),
        (x, "bob", "claimed"),
        (x, "bob", "approved"),
        (y, "alice", "lease_expired"),
        (y, "alice", "claimed"),
        (y, "alice", "rejected"),
        (y, "dave", "reopened"),
        (new, "dave", "created"),
    ]
    # A refused change writes nothing.
    with pytest.raises(ReviewError, match="lease expired"):
        queue.approve(z, "alice")
    assert events(queue) == log[-1]


# Engineered images: (cosines with nudity/gore/weapons, cosine with special-care minor). The policy
# (tests/review_factory.py): thresholds 0.25/0.30/0.28 (actions blur/blackout/review), minor 0.20
# (+0.01, escalates to review), review band 0.02.
MINOR_AND_NUDITY = ([0.26, 0.2, 0.1], [0.3])  # nudity 0.26-0.25+0.01 fires: blur, minor: queued
WEAPONS_NEAR_MISS = ([0.1, 0.1, 0.27], [0.1])  # weapons -0.01 is in the band: review
GORE_AND_WEAPONS = ([0.1, 0.35, 0.3], [0.1])  # both fire, blackout wins: not queued
WEAPONS = ([0.1, 0.1, 0.3], [0.1])  # weapons fires: review
NUDITY_NEAR_MISS = ([0.24, 0.1, 0.1], [0.1])  # nudity -0.01 in the band: review
CLEAN = ([0.0, 0.0, 0.0], [0.0])


def test_show_explains_scores_policy_and_history(queue):
    seeded = write(queue.url, decide([MINOR_AND_NUDITY, WEAPONS_NEAR_MISS]))
    decision = seeded.decisions[0]
    item_id = seeded.item_of[decision.decision_id]
    (claim,) = [c for c in queue.claim("alice", 2) if c.item_id == item_id]
    shown = queue.show(item_id)
    assert shown["item"]["status"] == "claimed" and shown["item"]["lease_live"] is True
    assert shown["item"]["claim_owner"] == "alice"
    assert shown["item"]["priority"] == 1, "a special-care hit comes first"
    assert shown["item"]["margin"] == pytest.approx(0.02, abs=1e-6)
    dec = shown  # the decision document: `decision` spread over the top level (CHANGELOG)
    assert dec["decision_id"] == decision.decision_id
    assert dec["image_sha256"] == decision.image_sha256
    assert dec["metadata"] == {"prompt": "a test image", "seed": 7, "user": "u1"}
    assert (dec["verdict"], dec["action"], dec["top_concept"]) == ("flag", "blur", "nudity")
    assert dec["fired"] == ["nudity"] and dec["margin"] == pytest.approx(0.02, abs=1e-6)
    assert dec["created_at"] == T0.isoformat() and dec["held_path"] is None
    assert shown["policy"] == {
        "name": "nsfw-basic",
        "version": "1",
        "digest": seeded.policy.digest,
        "model": "tiny-clip",  # was model_id
        "compat": None,
        "review_band": pytest.approx(0.02),
        "adjustment": pytest.approx(0.01),  # was special_care.adjustment
        "escalate": "review",  # was special_care.escalate
    }
    rows = sorted(shown["concepts"], key=lambda c: c["index"])  # policy order; listed nearest first
    assert [(c["name"], c["category"], c["severity"], c["action"]) for c in rows] == [
        ("nudity", "sexual", "high", "blur"),
        ("gore", "violence", "critical", "blackout"),
        ("weapons", "violence", "medium", "review"),
    ]
    approx = functools.partial(pytest.approx, abs=1e-6)
    assert [c["threshold"] for c in rows] == approx([0.25, 0.30, 0.28])
    assert [c["cosine"] for c in rows] == approx([0.26, 0.2, 0.1])
    assert [c["margin"] for c in rows] == approx([0.01, -0.1, -0.18])  # was margin_to_threshold
    assert [c["score"] for c in rows] == approx([0.02, -0.09, -0.17])  # + the 0.01 adjustment
    assert [c["fired"] for c in rows] == [True, False, False]
    care = shown["special_care"]
    assert care["adjustment"] == approx(0.01)  # was adjustment_applied
    assert care["hits"] == ["minor"]
    assert care["concepts"] == [
        {
            "name": "minor",
            "threshold": approx(0.2),
            "cosine": approx(0.3),
            "score": approx(0.1),
            "hit": True,
            "view": None,
        }
    ]
    assert [(e["actor"], e["event"]) for e in shown["events"]] == [
        ("system", "created"),
        ("alice", "claimed"),
    ]
    assert shown["events"][0]["details"] == {"priority": 1, "margin": approx(0.02)}
    assert shown["events"][1]["details"]["token"] == claim.token

    near_miss = queue.show(seeded.item_of[seeded.decisions[1].decision_id])
    assert (near_miss["verdict"], near_miss["action"]) == ("review", "review")
    assert near_miss["fired"] == [] and near_miss["item"]["priority"] == 0
    assert near_miss["special_care"]["adjustment"] == 0.0
    assert near_miss["special_care"]["hits"] == []


def test_only_what_the_engine_queues_gets_an_item(queue):
    images = [MINOR_AND_NUDITY, WEAPONS_NEAR_MISS, GORE_AND_WEAPONS, WEAPONS, CLEAN]
    seeded = write(queue.url, decide(images))
    queued = [d.decision_id in seeded.item_of for d in seeded.decisions]
    assert queued == [True, True, False, True, False]
    assert [i.decision_id for i in queue.list()] == [
        seeded.decisions[i].decision_id
        for i in (0, 3, 1)  # priority, then margin
    ]


def test_stats(queue, clock):
    images = [MINOR_AND_NUDITY, WEAPONS_NEAR_MISS, GORE_AND_WEAPONS, WEAPONS, NUDITY_NEAR_MISS]
    seeded = write(queue.url, decide([*images, CLEAN, CLEAN, CLEAN]))
    (a,) = queue.claim("alice", 1)
    (b,) = queue.claim("bob", 1)
    assert [a.decision_id, b.decision_id] == [seeded.decisions[i].decision_id for i in (0, 3)]
    queue.approve(b.item_id, "bob")
    clock.advance(LEASE)
    stats = queue.stats()
    assert stats["queue"] == {"pending": 2, "claimed": 1, "approved": 1, "rejected": 0}
    assert stats["expired_leases"] == 1
    oldest = seeded.item_of[seeded.decisions[1].decision_id]
    oldest_at = T0 + timedelta(seconds=1)
    assert stats["oldest_pending"] == {
        "item_id": oldest,
        "created_at": oldest_at.isoformat(),
        "age_seconds": (clock() - oldest_at).total_seconds(),
    }
    assert stats["decisions"] == {
        "total": 8,
        "by_action": {"allow": 3, "blackout": 1, "blur": 1, "review": 3},
        "by_verdict": {"allow": 3, "flag": 2, "review": 3},
        "by_concept": {"weapons": 2, "gore": 1, "nudity": 1},
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "can claim 1 to 1000 items at a time, not 0"),
        ({"n": "3"}, "can claim 1 to 1000 items at a time, not '3'"),
    ],
)
def test_claim_count_checked(queue, kwargs, message):
    with pytest.raises(ReviewError, match=f"^{message}$"):
        queue.claim("alice", **kwargs)


def test_lease_checked(db_url):
    with pytest.raises(ReviewError, match="lease must be a whole number of seconds >= 1, got 0"):
        ReviewQueue(db_url, lease_seconds=0)


def test_sqlite_lock_contention_is_retried(tmp_path, monkeypatch):
    queue = ReviewQueue(sqlite_url(tmp_path), now=Clock())
    seed(queue.url, 1)
    real, failures = review_module.immediate_transaction, []

    @contextmanager
    def busy_twice(engine):
        if len(failures) < 2:
            failures.append(1)
            raise exc.OperationalError(
                "BEGIN IMMEDIATE", {}, sqlite3.OperationalError("database is locked")
            )
        with real(engine) as conn:
            yield conn

    monkeypatch.setattr(review_module, "immediate_transaction", busy_twice)
    assert len(queue.claim("alice", 1)) == 1 and len(failures) == 2

    failures.clear()
    monkeypatch.setattr(review_module, "SQLITE_LOCK_WAIT_S", 0.0)
    with pytest.raises(
        ReviewError, match="^the database stayed locked by other writers for 0 s; try again$"
    ):
        queue.claim("bob", 1)
