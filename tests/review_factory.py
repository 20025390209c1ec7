"""Builders for review-queue tests: policy, decision and review-item rows, a clock, a claim worker.

Run as a script it is the claim worker of the concurrency tests:
`python tests/review_factory.py URL NAME BATCH` prints `ready`, waits for a line on stdin, then
claims (and approves) batches until the queue is empty and prints the claimed ids as JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
from sqlalchemy import Engine, func, insert, select

from moderation.storage.models import DecisionRow, PolicyRow, ReviewEvent, ReviewItem

PG_URL = os.environ.get("MODERATION_TEST_PG_URL")

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
ACTION_RANK = {"allow": 0, "review": 1, "blur": 2, "pixelate": 3, "blackout": 4}
CONCEPTS = [
    {
        "name": "nudity",
        "category": "sexual",
        "severity": "high",
        "threshold": 0.25,
        "action": "blur",
    },
    {
        "name": "gore",
        "category": "violence",
        "severity": "critical",
        "threshold": 0.30,
        "action": "blackout",
    },
    {
        "name": "weapons",
        "category": "violence",
        "severity": "medium",
        "threshold": 0.28,
        "action": "review",
    },
]
SPECIAL = [{"name": "minor", "threshold": 0.20}]
TABLES = (PolicyRow, DecisionRow, ReviewItem, ReviewEvent)


class Clock:
    """An injectable `now()` that only moves when told to."""

    def __init__(self, start: datetime = T0):
        self.t = start

    def __call__(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> datetime:
        self.t += timedelta(seconds=seconds)
        return self.t


def f32(values: list[float]) -> bytes:
    """float32 little-endian bytes, as the decision log stores cosines and scores."""
    return np.asarray(values, dtype="<f4").tobytes()


def policy_row(name: str = "nsfw-basic", version: str = "1", **overrides) -> dict:
    """A `policies` row; the digest is derived from name and version unless given."""
    row = {
        "digest": hashlib.sha256(f"{name}:{version}".encode()).hexdigest(),
        "name": name,
        "version": version,
        "model_id": "tiny-clip",
        "compat": None,
        "source": f"name: {name}\nversion: {version}\n",
        "concepts": CONCEPTS,
        "special_concepts": SPECIAL,
        "adjustment": 0.01,
        "escalate": "review",
        "review_band": 0.02,
        "created_at": T0,
    }
    row.update(overrides)
    return row


def decision_row(
    policy: dict,
    cosines: list[float],
    special_cosines: list[float] | None = None,
    *,
    created_at: datetime = T0,
    meta: dict | None = None,
    **overrides,
) -> dict:
    """A `decisions` row scored like the engine does: score = cosine - threshold + adjustment."""
    special_cosines = special_cosines if special_cosines is not None else [0.0]
    special_scores = [
        c - s["threshold"] for c, s in zip(special_cosines, policy["special_concepts"], strict=True)
    ]
    hits = [
        s["name"] for s, x in zip(policy["special_concepts"], special_scores, strict=True) if x > 0
    ]
    adjustment = policy["adjustment"] if hits else 0.0
    concepts = policy["concepts"]
    scores = [c - k["threshold"] + adjustment for c, k in zip(cosines, concepts, strict=True)]
    fired = [k["name"] for k, x in zip(concepts, scores, strict=True) if x > 0]
    action = max(
        (k["action"] for k in concepts if k["name"] in fired), key=ACTION_RANK.get, default="allow"
    )
    if hits and ACTION_RANK[action] < ACTION_RANK["review"]:
        action = "review"
    verdict = {"allow": "allow", "review": "review"}.get(action, "flag")
    top = max(range(len(scores)), key=scores.__getitem__)
    row = {
        "id": str(uuid.uuid4()),
        "created_at": created_at,
        "policy_digest": policy["digest"],
        "model_id": policy["model_id"],
        "image_sha256": hashlib.sha256(str(cosines).encode()).hexdigest(),
        "verdict": verdict,
        "action": action,
        "top_concept": concepts[top]["name"],
        "margin": scores[top],
        "fired": fired,
        "special_hits": hits,
        "adjustment": adjustment,
        "cosines": f32(cosines),
        "scores": f32(scores),
        "special_cosines": f32(special_cosines),
        "special_scores": f32(special_scores),
        "embedding": None,
        "meta": meta if meta is not None else {"prompt": "a test image", "seed": 7, "user": "u1"},
        "error": None,
        "held_path": None,
    }
    row.update(overrides)
    return row


@dataclass
class Seeded:
    """What `seed` wrote: the policy row, decision rows and review item ids (in insert order)."""

    policy: dict
    decisions: list[dict] = field(default_factory=list)
    item_ids: list[int] = field(default_factory=list)


def seed(
    engine: Engine,
    n: int = 5,
    *,
    policy: dict | None = None,
    start: datetime = T0,
    step_s: float = 1.0,
    rng_seed: int = 0,
    allowed: int = 0,
) -> Seeded:
    """Insert a policy, `n` decisions that need review with a pending item each, `allowed` more."""
    rng = random.Random(rng_seed)
    policy = policy or policy_row()
    out = Seeded(policy)
    for i in range(n + allowed):
        at = start + timedelta(seconds=i * step_s)
        if i < n:
            cosines = [rng.uniform(0.1, 0.4) for _ in policy["concepts"]]
            special = [rng.choice([0.1, 0.1, 0.1, 0.3]) for _ in policy["special_concepts"]]
        else:
            cosines = [0.0 for _ in policy["concepts"]]
            special = [0.0 for _ in policy["special_concepts"]]
        out.decisions.append(decision_row(policy, cosines, special, created_at=at))
    with engine.begin() as conn:
        if (
            conn.execute(
                select(PolicyRow.digest).where(PolicyRow.digest == policy["digest"])
            ).first()
            is None
        ):
            conn.execute(insert(PolicyRow), [policy])
        conn.execute(insert(DecisionRow), out.decisions)
        for d in out.decisions[:n]:
            item_id = conn.execute(
                insert(ReviewItem).values(
                    decision_id=d["id"],
                    status="pending",
                    priority=1 if d["special_hits"] else 0,
                    margin=d["margin"],
                    created_at=d["created_at"],
                    updated_at=d["created_at"],
                )
            ).inserted_primary_key[0]
            out.item_ids.append(item_id)
        events = [
            {
                "item_id": item_id,
                "decision_id": d["id"],
                "at": d["created_at"],
                "actor": "engine",
                "event": "created",
                "reason": None,
                "details": {},
            }
            for item_id, d in zip(out.item_ids, out.decisions[:n], strict=True)
        ]
        if events:
            conn.execute(insert(ReviewEvent), events)
    return out


def row_counts(engine: Engine) -> dict[str, int]:
    """Rows per table: hostile inputs must leave these unchanged."""
    with engine.connect() as conn:
        return {
            t.__tablename__: conn.execute(select(func.count()).select_from(t)).scalar_one()
            for t in TABLES
        }


def sqlite_url(folder) -> str:
    """A file database in `folder` (WAL; migrated by get_engine on first use)."""
    return f"sqlite:///{folder}/review.db"


@contextmanager
def pg_database(prefix: str) -> Iterator[str]:
    """A fresh, migrated database on the MODERATION_TEST_PG_URL server; dropped afterwards."""
    from moderation.storage import upgrade
    from tests.pg import temporary_pg_database

    with temporary_pg_database(PG_URL, prefix) as url:
        upgrade(url)
        yield url


def empty_pg(url: str) -> None:
    """Delete every row so each test starts from an empty database (faster than TRUNCATE)."""
    from moderation.storage import db

    with db.engine_for(url).begin() as conn:
        for table in ("review_events", "review_items", "decisions", "policies"):
            conn.exec_driver_sql(f"DELETE FROM {table}")


def claim_worker(url: str, name: str, batch: int) -> list[int]:
    """Claim `batch` items at a time and approve each with its token until none are left."""
    from moderation.review.queue import ReviewQueue

    queue = ReviewQueue(url)
    claimed: list[int] = []
    while claims := queue.claim(name, batch):
        for c in claims:
            claimed.append(c.item_id)
            queue.approve(c.item_id, name, token=c.token)
    return claimed


if __name__ == "__main__":
    url, name, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    from moderation.review.queue import ReviewQueue

    ReviewQueue(url)  # connect (and import everything) before the start line
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps(claim_worker(url, name, batch)), flush=True)
