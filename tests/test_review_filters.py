"""`ReviewQueue.list` filters, and hostile filter values that must match nothing and change nothing."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import moderation.cli.review_cmds  # noqa: F401  (registers the review commands)
from moderation.cli import main
from moderation.review.queue import ReviewQueue
from moderation.review.rules import ReviewError
from tests.review_factory import (
    T0,
    review_policy,
    row_counts,
    seed,
)

HOSTILE = ["' OR 1=1 --", "id; DROP TABLE decisions", "%", "_", "nsfw%", "x' UNION SELECT 1 --"]


@pytest.fixture
def seeded(db_url):
    """Two policies: five items of nsfw-basic v1, three of strict v2."""
    queue = ReviewQueue(db_url)
    basic = seed(db_url, 5, rng_seed=1, allowed=2)
    strict = seed(
        db_url, 3, rng_seed=2, policy=review_policy("strict", "2"), start=T0.replace(hour=13)
    )
    return queue, basic, strict


def ids(items) -> set[int]:
    return {i.id for i in items}


def test_filter_by_policy_name_or_digest_prefix(seeded):
    queue, basic, strict = seeded
    assert ids(queue.list(policy="nsfw-basic")) == set(basic.item_ids)
    assert ids(queue.list(policy=strict.policy.digest[:8])) == set(strict.item_ids)
    assert ids(queue.list(policy=strict.policy.digest)) == set(strict.item_ids)
    assert queue.list(policy="nsfw") == [], "names match exactly, only digests by prefix"


def test_filter_by_fired_concept(seeded):
    queue, basic, strict = seeded
    by_item = {s.item_of[d.decision_id]: d for s in (basic, strict) for d in s.reviewed}
    for concept in ("nudity", "gore", "weapons"):
        expected = {i for i, d in by_item.items() if concept in d.fired}
        assert expected and expected != set(by_item), f"the seed should fire {concept} sometimes"
        assert ids(queue.list(concept=concept)) == expected
    assert queue.list(concept="minor") == [], "special-care hits are not fired concepts"


def test_filter_by_status_since_and_limit(seeded):
    queue, basic, strict = seeded
    (claim,) = queue.claim("alice", 1)
    assert ids(queue.list(status="claimed")) == {claim.item_id}
    assert len(queue.list(status="pending")) == 7
    assert ids(queue.list(since="2024-05-01T13:00:00Z")) == set(strict.item_ids)
    assert ids(queue.list(since="2024-05-01T12:00:03")) == set(basic.item_ids[3:] + strict.item_ids)
    assert len(queue.list(since="2024-05-01")) == 8
    assert queue.list(since="2024-05-02") == []
    assert ids(queue.list(until="2024-05-01T13:00:00Z")) == set(basic.item_ids)
    window = queue.list(since="2024-05-01T12:00:03", until="2024-05-01T13:00:00Z")
    assert ids(window) == set(basic.item_ids[3:])
    limited = queue.list(limit=3)
    assert [i.id for i in limited] == [i.id for i in queue.list()][:3]
    assert limited[0].to_dict()["created_at"].endswith("+00:00")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"since": "yesterday"}, 'invalid since "yesterday": expected an ISO date or datetime'),
        ({"limit": 0}, "limit must be 1 to 10000, not 0"),
        ({"policy": " "}, "policy filter is empty"),
        ({"concept": ""}, "concept filter is empty"),
    ],
)
def test_bad_filter_values(seeded, kwargs, message):
    queue = seeded[0]
    with pytest.raises(ReviewError, match=message):
        queue.list(**kwargs)


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_filters_match_nothing_and_change_nothing(seeded, value):
    queue = seeded[0]
    before = row_counts(queue.engine)
    assert queue.list(policy=value) == []
    assert queue.list(concept=value) == []
    with pytest.raises(
        ReviewError, match="^unknown status .*; choose from pending, claimed, approved, rejected$"
    ):
        queue.list(status=value)
    with pytest.raises(ReviewError, match="invalid since"):
        queue.list(since=value)
    assert row_counts(queue.engine) == before


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_filters_through_the_cli(seeded, db_url, value):
    queue = seeded[0]
    before = row_counts(queue.engine)
    runner = CliRunner()
    for option in ("--policy", "--concept"):
        # A policy or concept that no logged policy has is named as a mistake (issue 19), with
        # the value escaped, in one line; nothing is changed.
        for extra in ([], ["--json"]):
            result = runner.invoke(
                main,
                ["review", "list", option, value, *extra, "--db", db_url],
                catch_exceptions=False,
            )
            assert result.exit_code == 1, result.output
            (line,) = result.output.splitlines()
            assert line.startswith(f"Error: no {option.lstrip('-')} "), line
    result = runner.invoke(
        main, ["review", "list", "--status", value, "--db", db_url], catch_exceptions=False
    )
    assert result.exit_code == 2
    assert "Invalid value for '--status'" in result.output
    assert row_counts(queue.engine) == before


def test_hostile_names_and_reasons_are_stored_verbatim(seeded):
    queue = seeded[0]
    name, reason = "x'); DROP TABLE review_items; --", "'; DELETE FROM review_events; --"
    (claim,) = queue.claim(name, 1)
    queue.reject(claim.item_id, name, reason=reason, token=claim.token)
    shown = queue.show(claim.item_id)
    assert (shown["item"]["reviewer"], shown["item"]["reason"]) == (name, reason)
    assert [(e["actor"], e["event"]) for e in shown["events"]][-2:] == [
        (name, "claimed"),
        (name, "rejected"),
    ]
    assert row_counts(queue.engine)["review_items"] == 8


def test_parse_time_reads_iso_and_spans_back_from_now():
    from datetime import datetime, timezone

    import pytest

    from moderation.times import parse_time

    now = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)
    assert parse_time("2026-11-30") == datetime(2026, 11, 30, tzinfo=timezone.utc)
    assert parse_time("2026-11-30T10:00:00Z") == datetime(2026, 11, 30, 10, tzinfo=timezone.utc)
    assert parse_time("2026-11-30T10:00:00+02:00") == datetime(2026, 11, 30, 8, tzinfo=timezone.utc)
    assert parse_time("90m", now=now) == datetime(2026, 12, 2, 10, 30, tzinfo=timezone.utc)
    assert parse_time("12h", now=now) == datetime(2026, 12, 2, 0, 0, tzinfo=timezone.utc)
    assert parse_time("7d", now=now) == datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
    assert parse_time("2W", now=now) == datetime(2026, 11, 18, 12, 0, tzinfo=timezone.utc)
    with pytest.raises(ValueError, match=r'invalid until "yesterday\\x1b"') as err:
        parse_time("yesterday\x1b", what="until")
    assert "\n" not in str(err.value)
