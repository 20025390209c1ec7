"""Synthetic policy and decision records for tests, benchmarks and demos (no model needed)."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timedelta, timezone

import numpy as np

from moderation.storage.records import DecisionRecord, PolicyRecord

CONCEPTS = ("violence", "gore", "weapon", "nudity")  # C = 4
SPECIAL = ("minor",)  # S = 1


def example_policy(name: str = "example") -> PolicyRecord:
    """A small policy record whose digest depends on its name."""
    source = f"name: {name}\nversion: '1'\nconcepts: [{', '.join(CONCEPTS)}]\n"
    return PolicyRecord(
        digest=hashlib.sha256(source.encode()).hexdigest(),
        name=name,
        version="1",
        model_id="tiny-clip",
        compat=None,
        source=source,
        concepts=[
            {"name": c, "category": "harm", "severity": "high", "threshold": 0.2, "action": "blur"}
            for c in CONCEPTS
        ],
        special_concepts=[{"name": s, "threshold": 0.3} for s in SPECIAL],
        adjustment=0.01,
        escalate="review",
        review_band=0.05,
    )


def example_decisions(
    n: int,
    policy: PolicyRecord,
    *,
    dim: int = 768,
    seed: int = 0,
    review_every: int = 0,
    start: datetime | None = None,
) -> list[DecisionRecord]:
    """`n` random decisions; every `review_every`-th one needs review (0: none)."""
    rng = np.random.default_rng(seed)
    start = start or datetime(2025, 1, 1, tzinfo=timezone.utc)
    cosines = rng.uniform(-0.2, 0.5, (n, len(CONCEPTS))).astype(np.float32)  # [N, C]
    special = rng.uniform(-0.2, 0.5, (n, len(SPECIAL))).astype(np.float32)  # [N, S]
    embeddings = rng.standard_normal((n, dim)).astype(np.float16)  # [N, D]
    records = []
    for i in range(n):
        scores = cosines[i] - np.float32(0.2)  # [C]
        top = int(scores.argmax())
        review = bool(review_every) and i % review_every == 0
        records.append(
            DecisionRecord(
                id=str(uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | i, version=4)),
                created_at=start + timedelta(milliseconds=i),
                policy_digest=policy.digest,
                model_id=policy.model_id,
                image_sha256=hashlib.sha256(f"{seed}:{i}".encode()).hexdigest(),
                verdict="review" if review else "allow",
                action="review" if review else "allow",
                top_concept=CONCEPTS[top],
                margin=float(scores[top]),
                fired=[c for c, s in zip(CONCEPTS, scores, strict=True) if s > 0],
                special_hits=[],
                adjustment=0.0,
                cosines=cosines[i],
                scores=scores,
                special_cosines=special[i],
                special_scores=special[i] - np.float32(0.3),
                embedding=embeddings[i],
                meta={"prompt": f"prompt {i}", "seed": i, "user": "tester"},
                error=None,
                needs_review=review,
                priority=1 if review and i % (2 * review_every) == 0 else 0,
            )
        )
    return records
