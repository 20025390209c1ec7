"""Decision: what the engine concluded about one image, and why."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from policy.compiled import CompiledPolicy

VERDICTS = ("allow", "flag", "review", "error")


def new_decision_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(eq=False)
class Decision:
    """One image's verdict with every number that led to it.

    Per-concept arrays follow the compiled policy's order (`policy.concept_names`), so a decision
    over 100,000 concepts costs one array, not a dict; `concept_scores` builds the dict on demand.
    """

    verdict: str  # allow | flag | review | error
    action: str  # allow | review | blur | pixelate | blackout
    policy: CompiledPolicy = field(repr=False)
    cosines: np.ndarray = field(repr=False)  # [C] float32
    scores: np.ndarray = field(repr=False)  # [C] float32: cos - threshold + adjustment
    special_cosines: np.ndarray = field(repr=False)  # [S] float32
    special_scores: np.ndarray = field(repr=False)  # [S] float32
    fired: tuple[str, ...] = ()
    special_hits: tuple[str, ...] = ()
    adjustment: float = 0.0
    margin: float | None = None  # highest concept score; None when the image could not be scored
    top_concept: str | None = None
    error: str | None = None
    embedding: np.ndarray | None = field(default=None, repr=False)  # [D] float32
    image_sha256: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    decision_id: str = field(default_factory=new_decision_id)
    created_at: datetime = field(default_factory=utcnow)

    @property
    def flagged(self) -> bool:
        """True when the caller does not get the image as it was."""
        return self.action != "allow"

    @property
    def needs_review(self) -> bool:
        return self.action == "review" or bool(self.special_hits)

    @property
    def concept_scores(self) -> dict[str, float]:
        return dict(zip(self.policy.concept_names, self.scores.tolist(), strict=True))

    @property
    def special_care_scores(self) -> dict[str, float]:
        return dict(zip(self.policy.special_names, self.special_scores.tolist(), strict=True))

    def explain(self, top: int | None = None) -> list[dict[str, Any]]:
        """Per-concept rows (name, category, action, cosine, threshold, score, fired), best first."""
        thresholds = self.policy.thresholds.detach().cpu().numpy()
        order = np.argsort(-self.scores, kind="stable") if self.scores.size else np.array([], int)
        if top is not None:
            order = order[:top]
        rows = []
        for i in order.tolist():
            name = self.policy.concept_names[i]
            rows.append(
                {
                    "concept": name,
                    "category": self.policy.categories[i],
                    "action": self.policy.actions[i],
                    "cosine": float(self.cosines[i]),
                    "threshold": float(thresholds[i]),
                    "score": float(self.scores[i]),
                    "fired": name in self.fired,
                }
            )
        return rows

    def to_dict(self, *, top: int | None = 5) -> dict[str, Any]:
        """A JSON-able summary: the stable shape printed by `--json`."""
        return {
            "decision_id": self.decision_id,
            "created_at": self.created_at.isoformat(),
            "verdict": self.verdict,
            "action": self.action,
            "fired": list(self.fired),
            "special_care": list(self.special_hits),
            "adjustment": self.adjustment,
            "margin": self.margin,
            "top_concept": self.top_concept,
            "error": self.error,
            "image_sha256": self.image_sha256,
            "policy": {
                "name": self.policy.name,
                "version": self.policy.version,
                "digest": self.policy.digest,
            },
            "model": self.policy.model,
            "concepts": self.explain(top=top),
            "metadata": self.metadata,
        }
