"""Records handed to the decision log (one policy, one decision + optional review item), and their
rows: arrays as little-endian bytes, rows <-> spool JSON."""

from __future__ import annotations

import base64
import math
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from moderation.storage.db import json_dumps
from moderation.storage.errors import StorageError
from moderation.storage.storable import storable_text

if TYPE_CHECKING:
    from moderation.decision import Decision
    from policy.compiled import CompiledPolicy


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
    embedding: np.ndarray | None  # [V, D] float16, one row per view ([D] is taken as one view)
    meta: dict
    error: str | None
    needs_review: bool = False
    priority: int = 0  # 1 = special-care escalation
    held_image: bytes | None = None  # PNG bytes of the original, stored before the row is written
    views: list[dict] | None = None  # [{"frame": int, "box": [l, t, r, b]}]; None: one whole view
    concept_views: np.ndarray | None = None  # [C] int16: view of each concept's max cosine
    special_views: np.ndarray | None = None  # [S] int16
    shadow_of: str | None = None  # id of the live decision this shadow decision accompanies
    encoder_digest: str | None = None  # the tower that embedded the image (None: not known)
    value_range: str | None = None  # "0,1", "-1,1", "both": how a float input was read


F32 = np.dtype("<f4")
F16 = np.dtype("<f2")
I16 = np.dtype("<i2")
_BINARY_COLUMNS = (
    "cosines",
    "scores",
    "special_cosines",
    "special_scores",
    "embedding",
    "concept_views",
    "special_views",
)
_DATETIME_COLUMNS = ("created_at",)
_JSON_COLUMNS = ("fired", "special_hits", "meta")
NULLABLE_JSON_COLUMNS = ("views",)  # None is SQL NULL, not JSON null
# Columns added after spool records were first written: an older record has none (NULL).
_LATER_COLUMNS = ("encoder_digest", "value_range")


def encode_array(
    values: np.ndarray | None, dtype: np.dtype, what: str, *, ndim: int = 1
) -> bytes | None:
    """A 1-D (or, with ndim=2, [rows, width]) array as little-endian bytes of `dtype`."""
    if values is None:
        return None
    array = np.asarray(values)
    if array.ndim not in range(1, ndim + 1):
        shape = "a 1-D array" if ndim == 1 else "a 1-D or 2-D array"
        raise StorageError(f"{what} must be {shape}, got shape {tuple(array.shape)}")
    return array.astype(dtype, copy=False).tobytes()


def decode_array(data: bytes | None, dtype: np.dtype = F32) -> np.ndarray | None:
    """Bytes from a binary column back to a (writable) 1-D array."""
    if data is None:
        return None
    return np.frombuffer(data, dtype=dtype).copy()


def utc(value: datetime) -> datetime:
    """A timezone-aware UTC datetime (naive values are taken as UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def policy_row(record: PolicyRecord) -> dict[str, Any]:
    """Column values of `policies` for a PolicyRecord."""
    row = asdict(record)
    row["concepts"] = [dict(c) for c in record.concepts]
    row["special_concepts"] = [dict(c) for c in record.special_concepts]
    row["adjustment"] = float(record.adjustment)
    row["review_band"] = float(record.review_band)
    return row


def decision_row(record: DecisionRecord, held_path: str | None) -> dict[str, Any]:
    """Column values of `decisions` for a DecisionRecord (arrays encoded, time in UTC)."""
    where = f"decision {record.id}"
    return {
        "id": str(record.id),
        "created_at": utc(record.created_at),
        "policy_digest": record.policy_digest,
        "model_id": record.model_id,
        "image_sha256": record.image_sha256,
        "verdict": record.verdict,
        "action": record.action,
        "top_concept": record.top_concept,
        "margin": _finite_or_none(record.margin),
        "fired": list(record.fired),
        "special_hits": list(record.special_hits),
        "adjustment": float(record.adjustment),
        "cosines": encode_array(record.cosines, F32, f"{where}: cosines"),
        "scores": encode_array(record.scores, F32, f"{where}: scores"),
        "special_cosines": encode_array(record.special_cosines, F32, f"{where}: special_cosines"),
        "special_scores": encode_array(record.special_scores, F32, f"{where}: special_scores"),
        "embedding": encode_array(record.embedding, F16, f"{where}: embedding", ndim=2),
        "meta": dict(record.meta or {}),
        "error": storable_text(record.error),
        "held_path": held_path,
        "views": None if record.views is None else [dict(v) for v in record.views],
        "concept_views": encode_array(record.concept_views, I16, f"{where}: concept_views"),
        "special_views": encode_array(record.special_views, I16, f"{where}: special_views"),
        "shadow_of": record.shadow_of,
        "encoder_digest": record.encoder_digest,
        "value_range": record.value_range,
    }


def review_of(record: DecisionRecord) -> dict[str, Any] | None:
    """What the pending review item of a record needs (None when it needs no review)."""
    if not record.needs_review or record.shadow_of is not None:
        return None  # a shadow decision is never queued, whatever it says
    # Errors have no margin: queue them as borderline (0.0) rather than first or last.
    margin = _finite_or_none(record.margin)
    margin = 0.0 if margin is None else margin
    return {"priority": int(record.priority), "margin": margin}


def _finite_or_none(value: float | None) -> float | None:
    # SQLite silently turns NaN into NULL; make that explicit and the same on every backend.
    return None if value is None or not math.isfinite(value) else float(value)


def record_from_row(row: Any) -> DecisionRecord:
    """A DecisionRecord from a `decisions` row (ORM object or mapping); held_image stays None."""
    get = row.__getitem__ if isinstance(row, dict) else lambda name: getattr(row, name)
    names = [f.name for f in fields(DecisionRecord) if f.init]
    values = {n: get(n) for n in names if n not in ("needs_review", "priority", "held_image")}
    for name in ("cosines", "scores", "special_cosines", "special_scores"):
        values[name] = decode_array(values[name], F32)
    for name in ("concept_views", "special_views"):
        values[name] = decode_array(values[name], I16)
    views = values["views"]
    embedding = decode_array(values["embedding"], F16)
    if embedding is not None:
        embedding = embedding.reshape(len(views) if views else 1, -1)  # [V, D]
    values["embedding"] = embedding
    values["created_at"] = utc(values["created_at"])
    return DecisionRecord(**values)


def json_column(row: dict[str, Any], column: str) -> str | None:
    """JSON text of a JSON column of a decisions row; StorageError names the decision."""
    if row[column] is None and column in NULLABLE_JSON_COLUMNS:
        return None  # SQL NULL
    try:
        return json_dumps(row[column])
    except (TypeError, ValueError) as err:
        raise StorageError(
            f"decision {row['id']}: {column} cannot be stored as JSON: {err}"
        ) from err


def row_to_json(row: dict[str, Any]) -> dict[str, Any]:
    """A decisions row as JSON-safe values (bytes -> base64, datetime -> ISO text)."""
    out = dict(row)
    for name in _JSON_COLUMNS:
        json_column(row, name)  # fail here, naming the decision, not later in the spool
    for name in _BINARY_COLUMNS:
        if out[name] is not None:
            out[name] = base64.b64encode(out[name]).decode("ascii")
    for name in _DATETIME_COLUMNS:
        out[name] = out[name].isoformat()
    return out


def row_from_json(data: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `row_to_json`."""
    row = dict(data)
    for name in _LATER_COLUMNS:
        row.setdefault(name, None)
    for name in _BINARY_COLUMNS:
        if row[name] is not None:
            row[name] = base64.b64decode(row[name])
    for name in _DATETIME_COLUMNS:
        row[name] = utc(datetime.fromisoformat(row[name]))
    return row


# -- from the engine's objects ---------------------------------------------------------------


def policy_record(policy: CompiledPolicy) -> PolicyRecord:
    """The record that stores a compiled policy once per digest."""
    thresholds = policy.thresholds.detach().cpu().tolist()
    special_thresholds = policy.special_thresholds.detach().cpu().tolist()
    vectors, special_vectors = policy.vector_digests
    concepts = [
        {"name": n, "category": c, "severity": s, "threshold": t, "action": a, "vector": v}
        for n, c, s, t, a, v in zip(
            policy.concept_names,
            policy.categories,
            policy.severities,
            thresholds,
            policy.actions,
            vectors,
            strict=True,
        )
    ]
    special = [
        {"name": n, "threshold": t, "vector": v}
        for n, t, v in zip(policy.special_names, special_thresholds, special_vectors, strict=True)
    ]
    return PolicyRecord(
        digest=policy.digest,
        name=policy.name,
        version=policy.version,
        model_id=policy.model,
        compat=policy.compat,
        source=policy.source,
        concepts=concepts,
        special_concepts=special,
        adjustment=policy.adjustment,
        escalate=policy.escalate,
        review_band=policy.review_band,
    )


def record_of(d: Decision, held_image: bytes | None = None) -> DecisionRecord:
    """The record that logs one decision (float16 embedding, float32 score arrays)."""
    return DecisionRecord(
        id=d.decision_id,
        created_at=d.created_at,
        policy_digest=d.policy.digest,
        model_id=d.policy.model,
        image_sha256=d.image_sha256,
        verdict=d.verdict,
        action=d.action,
        top_concept=d.top_concept,
        margin=d.margin,
        fired=list(d.fired),
        special_hits=list(d.special_hits),
        adjustment=d.adjustment,
        cosines=d.cosines,
        scores=d.scores,
        special_cosines=d.special_cosines,
        special_scores=d.special_scores,
        embedding=None if d.embedding is None else d.embedding.astype(np.float16),
        views=d.views,
        concept_views=d.concept_views,
        special_views=d.special_views,
        shadow_of=d.shadow_of,
        encoder_digest=d.encoder_digest,
        value_range=d.value_range,
        meta=d.metadata,
        error=d.error,
        needs_review=d.needs_review,
        priority=1 if d.special_hits else 0,
        held_image=held_image,
    )
