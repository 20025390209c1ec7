"""Review-queue test data made by the product: a compiled policy, the engine's decisions, and the
decision log's own review items and `created` events; plus a clock and a claim worker.

Images are stood in for by engineered embeddings: with one orthogonal axis per concept, an
embedding has exactly the cosines it was built with, so a test chooses what each concept sees and
the engine (`Moderator.moderate_embeddings`) decides what that means.

Run as a script it is the claim worker of the concurrency tests:
`python tests/review_factory.py URL NAME BATCH` prints `ready`, waits for a line on stdin, then
claims (and approves) batches until the queue is empty and prints the claimed ids as JSON.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, func, select

from moderation.storage import DecisionLog, db
from moderation.storage.models import DecisionRow, PolicyRow, ReviewEvent, ReviewItem
from moderation.storage.records import policy_record, record_of

if TYPE_CHECKING:
    from moderation.decision import Decision
    from policy import CompiledPolicy

PG_URL = os.environ.get("MODERATION_TEST_PG_URL")

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
META = {"prompt": "a test image", "seed": 7, "user": "u1"}
DIM = 8  # axes 0-2: concepts, 3: special care, 7: the rest of an image's direction
REST_AXIS = DIM - 1
POLICY_YAML = """\
policy: {name}
version: {version}
model: tiny-clip
review_band: 0.02
defaults: {{threshold: 0.25, action: blackout, severity: high}}
categories: [sexual, violence]
concepts:
  - {{name: nudity, category: sexual, embedding: {e0}, threshold: 0.25, action: blur}}
  - {{name: gore, category: violence, embedding: {e1}, threshold: 0.30, severity: critical}}
  - {{name: weapons, category: violence, embedding: {e2}, threshold: 0.28, action: review,
      severity: medium}}
special_care:
  adjustment: 0.01
  escalate: review
  concepts:
    - {{name: minor, embedding: {e3}, threshold: 0.20}}
"""
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


def axis(i: int) -> list[float]:
    return [1.0 if j == i else 0.0 for j in range(DIM)]


class _WidthOnly:
    """The compiler's encoder for a policy of literal embeddings: a width, no text tower."""

    model_id = "tiny-clip"
    embed_dim = DIM
    text_fingerprint = None

    def encode_text(self, prompts):
        from policy.encoding import EncodingError

        raise EncodingError("these test policies use literal embeddings only")

    def checkpoint_tensor(self, name):
        from policy.encoding import EncodingError

        raise EncodingError(f"no checkpoint tensor {name!r}")


@functools.cache
def review_policy(name: str = "nsfw-basic", version: str = "1") -> CompiledPolicy:
    """The review tests' policy, loaded and compiled by the real loader and compiler:
    nudity (blur, 0.25), gore (blackout, 0.30), weapons (review, 0.28), special care minor (0.20,
    +0.01, escalates to review), review band 0.02."""
    from policy import compile_policy, load_policy

    axes = {f"e{i}": axis(i) for i in range(4)}
    with tempfile.TemporaryDirectory(prefix="review-policy-") as folder:
        path = Path(folder) / f"{name}.yaml"
        path.write_text(POLICY_YAML.format(name=name, version=version, **axes), encoding="utf-8")
        return compile_policy(load_policy(path), _WidthOnly(), cache=False)


def embedding(cosines: Sequence[float], special: Sequence[float] = (0.0,)) -> list[float]:
    """A unit vector whose cosine with concept i is cosines[i] and with special care i special[i]."""
    head = [*cosines, *special]
    rest = 1.0 - sum(c * c for c in head)
    assert len(head) < REST_AXIS and rest >= 0, head
    return head + [0.0] * (REST_AXIS - len(head)) + [math.sqrt(rest)]


@dataclass
class Seeded:
    """What the engine decided and the log stored: decisions in time order, review item ids
    (in the order of their decisions) and the item of each reviewed decision id."""

    policy: CompiledPolicy
    decisions: list[Decision] = field(default_factory=list)
    item_ids: list[int] = field(default_factory=list)
    item_of: dict[str, int] = field(default_factory=dict)

    @property
    def reviewed(self) -> list[Decision]:
        """The decisions that got a review item."""
        return [d for d in self.decisions if d.decision_id in self.item_of]


def decide(
    images: Sequence[tuple[Sequence[float], Sequence[float]]],
    policy: CompiledPolicy | None = None,
) -> list[Decision]:
    """The engine's decisions on engineered images, each given as (cosines, special cosines)."""
    import torch

    from moderation.engine import Moderator

    policy = policy or review_policy()
    vectors = torch.tensor([embedding(c, s) for c, s in images], dtype=torch.float32)  # [B, D]
    return Moderator(policy).moderate_embeddings(vectors, metadata=META)


def write(
    url: str,
    decisions: Sequence[Decision],
    *,
    start: datetime = T0,
    step_s: float = 1.0,
) -> Seeded:
    """Log decisions through the real DecisionLog at start, start + step_s, ...; the log creates
    the review items and events. Raises if any decision did not reach the database."""
    policy = decisions[0].policy
    for i, d in enumerate(decisions):
        d.created_at = start + timedelta(seconds=i * step_s)
        # What Moderator.moderate fills in from the pixels; here the embedding stands for them.
        d.image_sha256 = hashlib.sha256(d.embedding.tobytes()).hexdigest()
    with tempfile.TemporaryDirectory(prefix="review-seed-") as scratch:
        spool = Path(scratch) / "spool"
        with DecisionLog(url, spool_dir=spool, held_dir=Path(scratch) / "held") as log:
            log.register_policy(policy_record(policy))
            log.write([record_of(d) for d in decisions])
            assert not log.spool.has_pending(), "the seed went to the spool, not the database"
    ids = [d.decision_id for d in decisions]
    with db.engine_for(url).connect() as conn:
        stored = conn.execute(
            select(func.count()).select_from(DecisionRow).where(DecisionRow.id.in_(ids))
        ).scalar_one()
        items = conn.execute(
            select(ReviewItem.decision_id, ReviewItem.id)
            .where(ReviewItem.decision_id.in_(ids))
            .order_by(ReviewItem.id)
        ).all()
    assert stored == len(ids), f"{len(ids) - stored} seeded decisions are not in the database"
    item_of = dict(items)
    return Seeded(policy, list(decisions), [item_of[i] for i in ids if i in item_of], item_of)


def seed(
    url: str,
    n: int = 5,
    *,
    policy: CompiledPolicy | None = None,
    start: datetime = T0,
    step_s: float = 1.0,
    rng_seed: int = 0,
    allowed: int = 0,
) -> Seeded:
    """`n` random decisions that the engine sends to review, then `allowed` clean ones.

    The first, fourth, seventh... reviewed decision was queued by a special-care hit (priority 1),
    the others by a concept (action review, or a score in the review band)."""
    policy = policy or review_policy()
    rng = random.Random(rng_seed)
    wanted = {True: len(range(0, n, 3)), False: n - len(range(0, n, 3))}
    pools: dict[bool, list[Decision]] = {True: [], False: []}
    while any(len(pools[k]) < wanted[k] for k in pools):
        candidates = [
            (
                [rng.uniform(0.1, 0.4) for _ in policy.concept_names],
                [rng.choice([0.1, 0.1, 0.1, 0.3]) for _ in policy.special_names],
            )
            for _ in range(4 * n + 8)
        ]
        for d in decide(candidates, policy):
            if d.needs_review:
                pools[bool(d.special_hits)].append(d)
    kept = [pools[i % 3 == 0].pop(0) for i in range(n)]
    clean = ([0.0] * len(policy.concept_names), [0.0] * len(policy.special_names))
    kept += decide([clean] * allowed, policy) if allowed else []
    return write(url, kept, start=start, step_s=step_s)


def row_counts(engine: Engine) -> dict[str, int]:
    """Rows per table: hostile inputs must leave these unchanged."""
    with engine.connect() as conn:
        return {
            t.__tablename__: conn.execute(select(func.count()).select_from(t)).scalar_one()
            for t in TABLES
        }


def sqlite_url(folder) -> str:
    """A migrated file database in `folder` (WAL; readers open existing databases only)."""
    from moderation.storage import upgrade

    url = f"sqlite:///{folder}/review.db"
    upgrade(url)
    return url


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
