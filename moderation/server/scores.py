"""OpenAI's `/v1/moderations` result from our decisions: flagged, categories, category scores.

- `flagged`: any image's decision is not `allow` (an image that could not be judged included).
- `categories[c]`: some concept of category `c` fired on some image.
- `category_scores[c] = 1 / (1 + exp(-s / SCORE_SCALE))` with `s` the highest concept score
  (`cosine - threshold + adjustment`) of category `c` over the images: monotone, 0.5 exactly at
  the threshold, above 0.5 once a concept fires. An image that could not be judged counts as 1.
- The keys are OpenAI's thirteen categories plus the policy's own; an OpenAI key the policy has
  no concept for is false / 0. Special-care concepts have no category.
- `category_applied_input_types[c]`: `["image"]` when the request held an image, else `[]`:
  text parts are never judged by this engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from moderation.decision import Decision
from policy import CompiledPolicy

OPENAI_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
SCORE_SCALE = 0.02  # knob: a concept score of +0.02 maps to 0.73, +0.06 to 0.95


def to_unit(score: float) -> float:
    """Our score (0 = at the threshold) mapped monotonically into [0, 1], 0.5 at the threshold."""
    if not math.isfinite(score):
        return 1.0  # not judged: as flagged as it gets (fail closed)
    x = max(-700.0, min(700.0, score / SCORE_SCALE))
    return 1.0 / (1.0 + math.exp(-x))


def category_keys(policy: CompiledPolicy) -> list[str]:
    own = [c for c in dict.fromkeys(policy.categories) if c and c not in OPENAI_CATEGORIES]
    return [*OPENAI_CATEGORIES, *own]


def moderation_result(
    policy: CompiledPolicy, decisions: Sequence[Decision], texts: int = 0
) -> dict:
    """One `results[]` entry of `/v1/moderations` for one request's images."""
    keys = category_keys(policy)
    best: dict[str, float] = {}
    fired: dict[str, bool] = {}
    for d in decisions:
        for i, category in enumerate(policy.categories):
            if not category:
                continue
            s = float(d.scores[i]) if d.verdict != "error" else math.inf
            if not math.isfinite(s):
                s = math.inf
            best[category] = max(best.get(category, -math.inf), s)
            fired[category] = fired.get(category, False) or policy.concept_names[i] in d.fired
    applied = ["image"] if decisions else []
    return {
        "flagged": any(d.action != "allow" for d in decisions),
        "categories": {k: fired.get(k, False) for k in keys},
        "category_scores": {k: to_unit(best[k]) if k in best else 0.0 for k in keys},
        "category_applied_input_types": {k: list(applied) for k in keys},
    }
