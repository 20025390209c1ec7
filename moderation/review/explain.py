"""Explain one review item: its decision, per-concept scores against the policy, and history."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Connection, select

from moderation.review.labels import decision_and_policy, item_labels
from moderation.review.queries import iso, utc
from moderation.storage.models import DecisionRow, PolicyRow, ReviewEvent, ReviewItem
from policy.vocabulary import DECIDED


def floats(blob: bytes | None) -> list[float]:
    """float32 little-endian bytes as Python floats ([] for a missing or empty blob)."""
    if not blob:
        return []
    return [float(x) for x in np.frombuffer(blob, dtype="<f4")]


def _at(values: list[float], i: int) -> float | None:
    # Error decisions carry empty or NaN arrays: a name without a (finite) value shows as None,
    # which keeps --json output valid JSON.
    value = values[i] if i < len(values) else None
    return value if value is not None and math.isfinite(value) else None


def concept_rows(policy: Any, decision: Any) -> list[dict[str, Any]]:
    """One row per policy concept: cosine, threshold, score, margin to threshold, fired."""
    cosines, scores = floats(decision.cosines), floats(decision.scores)
    fired = set(decision.fired or [])
    rows = []
    for i, concept in enumerate(policy.concepts or []):
        cosine, threshold = _at(cosines, i), concept.get("threshold")
        rows.append(
            {
                "name": concept.get("name"),
                "category": concept.get("category"),
                "severity": concept.get("severity"),
                "action": concept.get("action"),
                "threshold": threshold,
                "cosine": cosine,
                # score = cosine - threshold + adjustment; the margin leaves the adjustment out
                "score": _at(scores, i),
                "margin_to_threshold": (
                    None if cosine is None or threshold is None else cosine - threshold
                ),
                "fired": concept.get("name") in fired,
            }
        )
    return rows


def special_care(policy: Any, decision: Any) -> dict[str, Any]:
    """Special-care concepts with their cosines and hits, and the adjustment that was applied."""
    cosines, scores = floats(decision.special_cosines), floats(decision.special_scores)
    hits = set(decision.special_hits or [])
    concepts = [
        {
            "name": concept.get("name"),
            "threshold": concept.get("threshold"),
            "cosine": _at(cosines, i),
            "score": _at(scores, i),
            "hit": concept.get("name") in hits,
        }
        for i, concept in enumerate(policy.special_concepts or [])
    ]
    return {
        "hits": list(decision.special_hits or []),
        "adjustment_applied": decision.adjustment,
        "adjustment": policy.adjustment,
        "escalate": policy.escalate,
        "concepts": concepts,
    }


def explain_item(conn: Connection, item_id: int, now: datetime) -> dict[str, Any] | None:
    """The `show` document for one item, or None when there is no such item."""
    item = conn.execute(select(ReviewItem.__table__).where(ReviewItem.id == item_id)).first()
    if item is None:
        return None
    decision = conn.execute(
        select(DecisionRow.__table__).where(DecisionRow.id == item.decision_id)
    ).one()
    policy = conn.execute(
        select(PolicyRow.__table__).where(PolicyRow.digest == decision.policy_digest)
    ).one()
    events = conn.execute(
        select(ReviewEvent.__table__).where(ReviewEvent.item_id == item_id).order_by(ReviewEvent.id)
    ).all()
    reopened_as = conn.execute(
        select(ReviewItem.id).where(ReviewItem.reopened_from == item_id).order_by(ReviewItem.id)
    ).scalars()
    expires = item.claim_expires_at and utc(item.claim_expires_at)
    return {
        "item": {
            "id": item.id,
            "status": item.status,
            "priority": item.priority,
            "margin": item.margin,
            "created_at": iso(item.created_at),
            "updated_at": iso(item.updated_at),
            "claim_owner": item.claim_owner,
            "claim_expires_at": iso(expires),
            "lease_live": expires is not None and item.status == "claimed" and now < expires,
            "reviewer": item.reviewer,
            "reason": item.reason,
            "reopened_from": item.reopened_from,
            "reopened_as": list(reopened_as),
            # What the verdict says the image shows (None until a verdict): review/labels.py
            "labels": item_labels(item.status, item.labels, policy, decision),
        },
        "decision": decision_view(decision),
        "policy": policy_view(policy),
        "concepts": concept_rows(policy, decision),
        "special_care": special_care(policy, decision),
        "events": [event_view(e) for e in events],
    }


def decision_view(decision: Any) -> dict[str, Any]:
    """A decisions row as `review show` and `decisions show` print it."""
    return {
        "id": decision.id,
        "created_at": iso(decision.created_at),
        "verdict": decision.verdict,
        "action": decision.action,
        "top_concept": decision.top_concept,
        "margin": decision.margin,
        "fired": list(decision.fired or []),
        "model_id": decision.model_id,
        # which tower embedded the image and how its values were read (NULL before 0006)
        "encoder_digest": decision.encoder_digest,
        "value_range": decision.value_range,
        "image_sha256": decision.image_sha256,
        "held_path": decision.held_path,
        "held_file": held_file(decision.held_path),
        "meta": decision.meta or {},
        "error": decision.error,
    }


def policy_view(policy: Any) -> dict[str, Any]:
    """The logged policy a decision was made with, as both `show` documents print it."""
    return {
        "name": policy.name,
        "version": policy.version,
        "digest": policy.digest,
        "model_id": policy.model_id,
        "compat": policy.compat,
        "review_band": policy.review_band,
    }


def event_view(event: Any) -> dict[str, Any]:
    """One `review_events` row as JSON-ready fields."""
    return {
        "id": event.id,
        "item_id": event.item_id,
        "at": iso(event.at),
        "actor": event.actor,
        "event": event.event,
        "reason": event.reason,
        "details": event.details or {},
    }


def decision_labels(conn: Connection, decision_id: str) -> dict[str, Any] | None:
    """The labels of a decision's latest verdict, with the item they came from (None when no
    verdict stands: never reviewed, or its newest item awaits one after a reopen)."""
    item = conn.execute(
        select(ReviewItem.id, ReviewItem.status, ReviewItem.labels, ReviewItem.reviewer)
        .where(ReviewItem.decision_id == decision_id)
        .order_by(ReviewItem.id.desc())
        .limit(1)
    ).first()
    if item is None or item.status not in DECIDED:
        return None
    decision, policy = decision_and_policy(conn, decision_id)
    labels = item_labels(item.status, item.labels, policy, decision)
    return {"item_id": item.id, "verdict": item.status, "reviewer": item.reviewer, **labels}


def held_file(held_path: str | None) -> str | None:
    """The held original's full path: as the decision log recorded it; an older, relative path
    under $MODERATION_HELD_DIR (else ./held)."""
    from moderation.storage.held import HeldStore
    from moderation.storage.log import default_held_dir

    if held_path is None:
        return None
    return str(HeldStore(default_held_dir()).path_of(held_path).absolute())
