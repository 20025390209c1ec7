"""The decision document: the one JSON shape of a decision (docs/decision-document.md).

`Facts` holds what a decision is made of, read either from a live `Decision` (`live_facts`) or
from its logged rows (`row_facts`: a `decisions` row and its `policies` row); `document` turns
facts into the document. Every command that prints a decision (`check --json`, `decisions
show/list`, `review show`, `review export`), and the HTTP API and web desk, go through here, so a
decision has one vocabulary wherever it is read. The public entry points are in
moderation.decisions.document; this module reads no database (the review package builds on it).

What set the action (`action_reason`) is what the decision recorded; a row logged before the
reason was recorded gets it from the one decision rule (moderation.rule) over its logged scores,
with "unknown" when the logged policy cannot account for the logged action.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moderation.kernel import rule
from moderation.storage.blobs import F32, I16, decode_array
from moderation.times import iso
from policy.vocabulary import ACTIONS

if TYPE_CHECKING:
    from moderation.decision import Decision


@dataclass
class Facts:
    """Everything a decision document is made of, whichever side it was read from."""

    decision_id: str
    created_at: datetime | None
    policy: dict[
        str, Any
    ]  # name, version, digest, model, compat, adjustment, escalate, review_band
    names: list[str]
    categories: list[str | None]
    severities: list[str | None]
    actions: list[str | None]
    thresholds: list[float | None]
    special_names: list[str]
    special_thresholds: list[float | None]
    verdict: str
    action: str
    reason: str | None
    reason_concept: str | None
    fired: list[str]
    special_hits: list[str]
    adjustment: float | None
    margin: float | None
    top_concept: str | None
    cosines: np.ndarray  # [C] float32 (NaN or empty for an error)
    scores: np.ndarray
    special_cosines: np.ndarray
    special_scores: np.ndarray
    concept_views: list[int] | None
    special_views: list[int] | None
    views: list[dict[str, Any]] | None
    image_sha256: str | None
    metadata: dict[str, Any]
    error: str | None
    shadow_of: str | None
    recorded: bool | None
    encoder_digest: str | None = None
    value_range: str | None = None
    held_path: str | None = None
    held_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def finite(value: Any) -> Any:
    """NaN and infinity as None, in nested lists and dicts: the document is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def live_facts(d: Decision, *, recorded: bool | None) -> Facts:
    """The facts of a live decision (`recorded`: whether it is in the database or the spool;
    None when the caller does not know)."""
    p = d.policy
    views = d.views
    return Facts(
        decision_id=d.decision_id,
        created_at=d.created_at,
        policy=policy_summary(p),
        names=list(p.concept_names),
        categories=list(p.categories),
        severities=list(p.severities),
        actions=list(p.actions),
        thresholds=p.thresholds.detach().cpu().tolist(),
        special_names=list(p.special_names),
        special_thresholds=p.special_thresholds.detach().cpu().tolist(),
        verdict=d.verdict,
        action=d.action,
        reason=d.action_reason,
        reason_concept=d.reason_concept,
        fired=list(d.fired),
        special_hits=list(d.special_hits),
        adjustment=d.adjustment,
        margin=d.margin,
        top_concept=d.top_concept,
        cosines=np.asarray(d.cosines, np.float32),
        scores=np.asarray(d.scores, np.float32),
        special_cosines=np.asarray(d.special_cosines, np.float32),
        special_scores=np.asarray(d.special_scores, np.float32),
        concept_views=_view_list(d.concept_views, views, len(p.concept_names)),
        special_views=_view_list(d.special_views, views, len(p.special_names)),
        views=views,
        image_sha256=d.image_sha256,
        metadata=dict(d.metadata),
        encoder_digest=d.encoder_digest,
        value_range=d.value_range,
        error=d.error,
        shadow_of=d.shadow_of,
        recorded=recorded,
    )


def policy_summary(p: Any) -> dict[str, Any]:
    """`policy` of a compiled policy."""
    return _summary(p, p.model)


def row_policy_summary(p: Any) -> dict[str, Any]:
    """`policy` of a `policies` row."""
    return _summary(p, p.model_id)


def _summary(p: Any, model: str) -> dict[str, Any]:
    return {
        "name": p.name,
        "version": p.version,
        "digest": p.digest,
        "model": model,
        "compat": p.compat,
        "adjustment": float(p.adjustment or 0.0),
        "escalate": p.escalate,
        "review_band": float(p.review_band or 0.0),
    }


def floats(blob: bytes | None) -> np.ndarray:
    """A logged float32 column (empty for a missing blob)."""
    return decode_array(blob or b"", F32)


def _indexes(blob: bytes | None) -> list[int] | None:
    return None if not blob else decode_array(blob, I16).astype(int).tolist()


def _view_list(array: Any, views: Any, n: int) -> list[int] | None:
    if views is None:
        return None
    return [0] * n if array is None else np.asarray(array).astype(int).tolist()


def row_facts(decision: Any, policy: Any, *, held_file: str | None = None) -> Facts:
    """The facts of a logged decision: its `decisions` row and its `policies` row."""
    concepts, special = policy.concepts or [], policy.special_concepts or []
    views = decision.views
    reason = getattr(decision, "action_reason", None) or {}
    concept_views = _indexes(decision.concept_views)
    special_views = _indexes(decision.special_views)
    if views is not None:
        concept_views = concept_views or [0] * len(concepts)
        special_views = special_views or [0] * len(special)
    return Facts(
        decision_id=decision.id,
        created_at=decision.created_at,
        policy=row_policy_summary(policy),
        names=[c.get("name") for c in concepts],
        categories=[c.get("category") for c in concepts],
        severities=[c.get("severity") for c in concepts],
        actions=[c.get("action") for c in concepts],
        thresholds=[c.get("threshold") for c in concepts],
        special_names=[c.get("name") for c in special],
        special_thresholds=[c.get("threshold") for c in special],
        verdict=decision.verdict,
        action=decision.action,
        reason=reason.get("rule"),
        reason_concept=reason.get("concept"),
        fired=list(decision.fired or []),
        special_hits=list(decision.special_hits or []),
        adjustment=decision.adjustment,
        margin=decision.margin,
        top_concept=decision.top_concept,
        cosines=floats(decision.cosines),
        scores=floats(decision.scores),
        special_cosines=floats(decision.special_cosines),
        special_scores=floats(decision.special_scores),
        concept_views=concept_views,
        special_views=special_views,
        views=views,
        image_sha256=decision.image_sha256,
        metadata=dict(decision.meta or {}),
        encoder_digest=getattr(decision, "encoder_digest", None),
        value_range=getattr(decision, "value_range", None),
        error=decision.error,
        shadow_of=decision.shadow_of,
        recorded=True,
        held_path=decision.held_path,
        held_file=held_file,
    )


def _value(values: np.ndarray, i: int) -> float | None:
    # Error decisions carry empty or NaN arrays: no (finite) value shows as None.
    if i >= values.size:
        return None
    value = float(values[i])
    return value if math.isfinite(value) else None


def _view(f: Facts, indexes: list[int] | None, i: int) -> dict[str, Any] | None:
    """Which of the decision's views gave entry i its cosine (None: one view, the whole image)."""
    if f.views is None:
        return None
    index = indexes[i] if indexes is not None and i < len(indexes) else 0
    view = f.views[index] if 0 <= index < len(f.views) else {}
    shown = {"index": index, "frame": view.get("frame"), "box": view.get("box")}
    if "range" in view:  # an ambiguous image, judged under both readings: this view's reading
        shown["range"] = view["range"]
    return shown


@dataclass
class Ruled:
    """What the decision rule says about a decision's (logged) scores."""

    in_band: list[bool]
    reason: str
    reason_concept: str | None


def ruled(f: Facts) -> Ruled:
    """The review band of each concept and the reason for the action, from the one rule."""
    n = len(f.names)
    scored = (
        f.verdict != "error"
        and f.scores.size == n
        and f.special_scores.size == len(f.special_names)
    )
    known = all(a in ACTIONS for a in f.actions)
    if not scored or not known:
        reason = "error" if f.verdict == "error" else (f.reason or "unknown")
        return Ruled([False] * n, reason, f.reason_concept if f.reason else None)
    rules = rule.Rules.logged(
        f.actions, len(f.special_names), f.policy["escalate"], f.policy["review_band"]
    )
    outcome = rule.apply(
        rules,
        torch.from_numpy(np.array(f.scores, np.float32)[None, :]),
        torch.from_numpy(np.array(f.special_scores, np.float32)[None, :]),
    )
    in_band = outcome.in_band[0].tolist()
    if f.reason is not None:  # recorded at decision time
        return Ruled(in_band, f.reason, f.reason_concept)
    # Logged before reasons were recorded: the rule over the logged scores, as long as it
    # gives the logged action (else the logged policy does not account for it).
    if ACTIONS[int(outcome.rank[0, 0])] != f.action:
        return Ruled(in_band, "unknown", None)
    code, at = int(outcome.reason[0, 0]), int(outcome.reason_concept[0, 0])
    return Ruled(in_band, rule.REASONS[code], f.names[at] if at >= 0 else None)


def document(
    f: Facts,
    *,
    top: int | None = None,
    review: dict[str, Any] | None = None,
    labels: dict[str, Any] | None = None,
    shadows: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The decision document of `f` (`top`: only the nearest concepts; default every one)."""
    why = ruled(f)
    fired = set(f.fired)
    rows = []
    for i, name in enumerate(f.names):
        cosine, threshold = _value(f.cosines, i), f.thresholds[i]
        rows.append(
            {
                "name": name,
                "category": f.categories[i],
                "severity": f.severities[i],
                "action": f.actions[i],
                "cosine": cosine,
                "threshold": threshold,
                # score = cosine - threshold + adjustment; the margin leaves the adjustment out
                "score": _value(f.scores, i),
                "margin": None if cosine is None or threshold is None else cosine - threshold,
                "fired": name in fired,
                "in_review_band": bool(why.in_band[i]) if f.verdict != "error" else False,
                "view": _view(f, f.concept_views, i),
                "index": i,
            }
        )
    # Nearest first: highest score first (unscored rows last, in policy order).
    ordered = sorted(rows, key=lambda c: (c["score"] is None, -(c["score"] or 0.0)))
    listed = ordered if top is None else ordered[:top]
    hits = set(f.special_hits)
    special = [
        {
            "name": name,
            "cosine": _value(f.special_cosines, i),
            "threshold": f.special_thresholds[i],
            "score": _value(f.special_scores, i),
            "hit": name in hits,
            "view": _view(f, f.special_views, i),
        }
        for i, name in enumerate(f.special_names)
    ]
    band = float(f.policy.get("review_band") or 0.0)
    doc = {
        "decision_id": f.decision_id,
        "created_at": iso(f.created_at),
        "policy": dict(f.policy),
        "verdict": f.verdict,
        "action": f.action,
        "action_reason": action_reason(f, why),
        "fired": list(f.fired),
        "margin": f.margin,
        "top_concept": f.top_concept,
        "concepts": listed,
        "concepts_listed": len(listed),
        "concepts_total": len(rows),
        "special_care": {
            "hits": list(f.special_hits),
            "adjustment": f.adjustment,
            "concepts": special,
        },
        "review_band": {
            "band": band,
            "concepts": [r["name"] for r in rows if r["in_review_band"]],
        },
        "metadata": f.metadata,
        "image_sha256": f.image_sha256,
        "views": f.views,  # None: one view (the whole image, CLIP's centre crop)
        "value_range": f.value_range,  # how a float input was read (None: not a float input)
        "encoder_digest": f.encoder_digest,  # the tower (weights + preprocessing) that judged it
        "error": f.error,
        "shadow_of": f.shadow_of,
        "shadows": list(shadows),
        "recorded": f.recorded,
        "held_path": f.held_path,
        "held_file": f.held_file,
        "review": review,
        "labels": labels,
    }
    doc.update(f.extra)
    return finite(doc)


def action_reason(f: Facts, why: Ruled) -> dict[str, Any]:
    """`action_reason` of a decision's document and of its shadows' summaries."""
    return {
        "rule": why.reason,
        "concept": why.reason_concept,
        "text": rule.reason_text(why.reason, why.reason_concept, action=f.action, error=f.error),
    }


def live_document(
    decision: Decision,
    *,
    recorded: bool | Callable[[Decision], bool] | None = None,
    top: int | None = None,
) -> dict[str, Any]:
    """The document of a live decision, with its shadow decisions' summaries. `recorded`: a
    bool for the decision and its shadows, or a callable `Decision -> bool`; None: unknown."""
    was = recorded if callable(recorded) else (lambda _d: recorded)
    shadows = [shadow_summary(live_facts(s, recorded=was(s))) for s in decision.shadows]
    return document(live_facts(decision, recorded=was(decision)), top=top, shadows=shadows)


def shadow_summary(f: Facts) -> dict[str, Any]:
    """A shadow decision in its live decision's document (`shadows`): what a candidate
    policy would have decided about the same image, never acted on."""
    why = ruled(f)
    return finite(
        {
            "decision_id": f.decision_id,
            "shadow_of": f.shadow_of,
            "policy": dict(f.policy),
            "verdict": f.verdict,
            "action": f.action,
            "action_reason": action_reason(f, why),
            "fired": list(f.fired),
            "special_hits": list(f.special_hits),
            "margin": f.margin,
            "top_concept": f.top_concept,
            "error": f.error,
            "recorded": f.recorded,
        }
    )
