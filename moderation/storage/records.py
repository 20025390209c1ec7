"""Plain records handed to the decision log: one policy, one decision (+ optional review item)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np


@dataclass
class PolicyRecord:
    """One row of `policies`: the compiled policy's identity and its concept table."""

    digest: str
    name: str
    version: str
    model_id: str
    compat: str | None
    source: str
    concepts: list[dict]  # [{"name","category","severity","threshold","action"}] in matrix order
    special_concepts: list[dict]  # [{"name","threshold"}]
    adjustment: float
    escalate: str | None
    review_band: float


@dataclass
class DecisionRecord:
    """One row of `decisions`, plus a pending review item when `needs_review` is set."""

    id: str
    created_at: datetime
    policy_digest: str
    model_id: str
    image_sha256: str | None
    verdict: str
    action: str
    top_concept: str | None
    margin: float | None
    fired: list[str]
    special_hits: list[str]
    adjustment: float
    cosines: np.ndarray  # [C] float32, policy order
    scores: np.ndarray  # [C] float32
    special_cosines: np.ndarray  # [S] float32
    special_scores: np.ndarray  # [S] float32
    embedding: np.ndarray | None  # [D] float16
    meta: dict
    error: str | None
    needs_review: bool = False
    priority: int = 0  # 1 = special-care escalation
    held_image: bytes | None = None  # PNG bytes of the original, stored before the row is written
