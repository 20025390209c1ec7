"""A decision log for the `decisions` and live-reader tests, written by the product.

The engine (`Moderator.moderate_embeddings`) decides engineered embeddings under the review
tests' policy (tests/review_factory.py: nudity blur 0.25, gore blackout 0.30, weapons review
0.28, special care minor 0.20 +0.01 escalating to review, review band 0.02); the real
DecisionLog stores them a minute apart from T0, with their review items. One item is rejected
with labels through the ReviewQueue. Shadow decisions of a candidate policy (nudity at 0.35,
so the dolphin's nudity no longer fires) are written as DecisionRecords with `shadow_of` set,
as the shadow feature stores them.
"""

from __future__ import annotations

import functools
import math
import tempfile
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from moderation.engine import Moderator
from moderation.review.queue import ReviewQueue
from moderation.storage import DecisionLog
from moderation.storage.records import policy_record, record_of
from tests.review_factory import POLICY_YAML, T0, _WidthOnly, axis, embedding, review_policy, write

STEP = timedelta(minutes=1)
HOSTILE_USER = "eve\x1b[2J\nforged line"
TWINS = ("abcdef12-0000-4000-8000-000000000001", "abcdef12-0000-4000-8000-000000000002")
# A random (version 4) id, as a log written before ids were time-ordered holds.
RANDOM_ID = "5e1f0c2a-9d3b-4c6e-8f70-1a2b3c4d5e6f"
VIEWS = [{"frame": 0, "box": [0, 0, 32, 32]}, {"frame": 0, "box": [32, 0, 64, 32]}]


@functools.cache
def candidate_policy():
    """A candidate: the review policy with nudity's threshold moved from 0.25 to 0.35."""
    from policy import compile_policy, load_policy

    text = POLICY_YAML.format(
        name="nsfw-candidate", version="2", **{f"e{i}": axis(i) for i in range(4)}
    )
    text = text.replace("threshold: 0.25, action: blur", "threshold: 0.35, action: blur")
    with tempfile.TemporaryDirectory(prefix="candidate-") as folder:
        path = Path(folder) / "candidate.yaml"
        path.write_text(text, encoding="utf-8")
        return compile_policy(load_policy(path), _WidthOnly(), cache=False)


@dataclass
class Logged:
    """The ids of what was logged, by role (see `seed`)."""

    url: str
    ids: dict[str, str]  # role -> decision id
    order: list[str]  # live ids, oldest first
    shadows: dict[str, str]  # live role -> shadow decision id
    item_of: dict[str, int]  # role -> review item id
    candidate_digest: str
    live_digest: str


# role: (concept cosines nudity, gore, weapons; special cosines minor; metadata)
IMAGES = {
    "dolphin": ([0.30, 0.45, 0.0], [0.0], {"prompt": "a dolphin", "seed": 1, "user": "alice"}),
    "clean": ([0.05, 0.05, 0.05], [0.0], {"prompt": "a beach", "seed": 2, "user": "bob"}),
    "band": ([0.24, 0.0, 0.0], [0.0], {"prompt": "close call", "seed": 3, "user": "alice"}),
    "minor": ([0.1, 0.1, 0.1], [0.30], {"prompt": "a child\x07", "user": HOSTILE_USER}),
    "weapons": ([0.0, 0.0, 0.35], [0.0], {"prompt": "a sword", "user": "%"}),
    "numeric": ([0.0, 0.0, 0.0], [0.0], {"prompt": "id", "user": 42}),
}


def seed(url: str) -> Logged:
    policy = review_policy()
    moderator = Moderator(policy)
    roles = list(IMAGES)
    vectors = torch.tensor([embedding(IMAGES[r][0], IMAGES[r][1]) for r in roles])
    decisions = moderator.moderate_embeddings(vectors, metadata=[IMAGES[r][2] for r in roles])
    # Two views of one image: the whole-image view sees nothing, the right half nudity.
    views = torch.tensor([embedding([0.0, 0.0, 0.0]), embedding([0.5, 0.0, 0.0], [0.1])])
    decisions += moderator.moderate_embeddings(
        views, owners=torch.tensor([0, 0]), views=[VIEWS], metadata={"user": "carol"}
    )
    # A non-finite embedding: the engine's error decision (on_error blackout).
    broken = torch.full((1, len(embedding([0.0]))), math.nan)
    decisions += moderator.moderate_embeddings(broken, metadata={"user": "dave"})
    roles += ["views", "error"]
    for role, twin in zip(("clean", "numeric"), TWINS, strict=True):
        decisions[roles.index(role)].decision_id = twin  # ids that share a long prefix
    decisions[roles.index("weapons")].decision_id = RANDOM_ID
    seeded = write(url, decisions, start=T0, step_s=STEP.total_seconds())
    ids = {role: d.decision_id for role, d in zip(roles, decisions, strict=True)}
    item_of = {r: seeded.item_of[i] for r, i in ids.items() if i in seeded.item_of}
    ReviewQueue(url).reject(
        item_of["band"], "rita", reason="it does show nudity", concepts=["nudity"]
    )
    candidate = candidate_policy()
    shadows = shadow_decisions(url, candidate, decisions, roles, ("dolphin", "band", "views"))
    return Logged(
        url,
        ids,
        [d.decision_id for d in decisions],
        shadows,
        item_of,
        candidate.digest,
        policy.digest,
    )


def shadow_decisions(url, candidate, live, roles, which) -> dict[str, str]:
    """The candidate's decisions on the same embeddings, stored linked to the live ones."""
    by_role = dict(zip(roles, live, strict=True))
    records, out = [], {}
    for role in which:
        d = by_role[role]
        owners = None if d.views is None else torch.zeros(len(d.embedding), dtype=torch.long)
        (shadow,) = Moderator(candidate).moderate_embeddings(
            torch.from_numpy(np.asarray(d.embedding, dtype=np.float32)),
            owners=owners,
            views=None if d.views is None else [d.views],
            metadata=d.metadata,
        )
        shadow.created_at, shadow.image_sha256 = d.created_at, d.image_sha256
        record = replace(record_of(shadow), embedding=None, needs_review=False)
        records.append(replace(record, shadow_of=d.decision_id))
        out[role] = shadow.decision_id
    with tempfile.TemporaryDirectory(prefix="shadow-seed-") as scratch:
        spool = Path(scratch) / "spool"
        with DecisionLog(url, spool_dir=spool, held_dir=Path(scratch) / "held") as log:
            log.register_policy(policy_record(candidate))
            log.write(records)
            assert not log.spool.has_pending(), "the shadow rows went to the spool"
    return out
