"""Decision ids are time-ordered UUIDs: sorting by id is sorting by when they were made."""

from __future__ import annotations

import threading
import time
import uuid

from moderation import ids
from moderation.ids import new_decision_id, new_decision_ids


def test_ids_are_version_7_uuids_that_start_with_the_time():
    before = time.time_ns() // 1_000_000
    made = new_decision_ids(3)
    after = time.time_ns() // 1_000_000
    for text in made:
        u = uuid.UUID(text)
        assert str(u) == text
        assert (u.version, u.variant) == (7, uuid.RFC_4122)
        assert before <= u.int >> 80 <= after


def test_ids_increase_within_and_across_batches():
    made = new_decision_ids(1000) + [new_decision_id()] + new_decision_ids(5) + new_decision_ids(0)
    assert len(set(made)) == len(made) == 1006
    assert made == sorted(made)


def test_a_clock_that_steps_back_never_makes_a_smaller_id(monkeypatch):
    first = new_decision_ids(2)
    monkeypatch.setattr(ids.time, "time_ns", lambda: 1_000_000_000)  # 1970
    later = new_decision_ids(2)
    assert first + later == sorted(first + later)
    assert uuid.UUID(later[0]).int >> 80 == uuid.UUID(first[0]).int >> 80


def test_a_count_that_crosses_the_last_digits_stays_in_order(monkeypatch):
    # The generator's state comes back after the test: a clock in 2096 would stay otherwise.
    monkeypatch.setattr(ids, "_last_ms", ids._last_ms)
    monkeypatch.setattr(ids, "_next", ids._next)
    monkeypatch.setattr(ids.time, "time_ns", lambda: 4_000_000_000_000_000_000)
    monkeypatch.setattr(ids.os, "urandom", lambda n: ((1 << 48) - 2).to_bytes(n, "big"))
    made = new_decision_ids(4)  # ...fffe, ...ffff, then a carry into the 4th group
    assert made == sorted(made) and len(set(made)) == 4
    assert [uuid.UUID(m).int - uuid.UUID(made[0]).int for m in made] == [0, 1, 2, 3]


def test_threads_never_share_an_id():
    out: list[list[str]] = []

    def make():
        out.append([i for _ in range(50) for i in new_decision_ids(20)])

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for batch in out for i in batch]
    assert len(set(every)) == 4000
    assert all(batch == sorted(batch) for batch in out)


def test_one_batch_shares_one_time_and_its_ids_follow_the_images():
    import torch

    from moderation.engine import Moderator
    from tests.policy_factory import random_policy

    moderator = Moderator(random_policy(4, 1, 16, seed=2))
    embeddings = torch.randn(5, 16)
    embeddings[2, 0] = float("nan")  # an error decision is part of the batch too
    first = moderator.moderate_embeddings(embeddings)
    second = moderator.moderate_embeddings(embeddings[:2])
    failed = moderator.fail(["cannot decode", "cannot decode"])
    for batch in (first, second, failed):
        assert len({d.created_at for d in batch}) == 1
    ids = [d.decision_id for d in (*first, *second, *failed)]
    assert ids == sorted(ids) and len(set(ids)) == 9
    assert first[0].created_at <= second[0].created_at <= failed[0].created_at
