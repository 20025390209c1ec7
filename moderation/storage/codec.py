"""Records <-> table rows: arrays as little-endian bytes, and rows <-> spool JSON."""

from __future__ import annotations

import base64
import math
from dataclasses import asdict, fields
from datetime import datetime, timezone
from typing import Any

import numpy as np

from moderation.storage.db import json_dumps
from moderation.storage.errors import StorageError
from moderation.storage.records import DecisionRecord, PolicyRecord

F32 = np.dtype("<f4")
F16 = np.dtype("<f2")
_BINARY_COLUMNS = ("cosines", "scores", "special_cosines", "special_scores", "embedding")
_DATETIME_COLUMNS = ("created_at",)
_JSON_COLUMNS = ("fired", "special_hits", "meta")


def encode_array(values: np.ndarray | None, dtype: np.dtype, what: str) -> bytes | None:
    """A 1-D array as little-endian bytes of `dtype` (None stays None)."""
    if values is None:
        return None
    array = np.asarray(values)
    if array.ndim != 1:
        raise StorageError(f"{what} must be a 1-D array, got shape {tuple(array.shape)}")
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
        "embedding": encode_array(record.embedding, F16, f"{where}: embedding"),
        "meta": dict(record.meta or {}),
        "error": record.error,
        "held_path": held_path,
    }


def review_of(record: DecisionRecord) -> dict[str, Any] | None:
    """What the pending review item of a record needs (None when it needs no review)."""
    if not record.needs_review:
        return None
    # Errors have no margin: queue them as borderline (0.0) rather than first or last.
    margin = _finite_or_none(record.margin)
    margin = 0.0 if margin is None else margin
    return {"priority": int(record.priority), "margin": margin}


def _finite_or_none(value: float | None) -> float | None:
    # SQLite silently turns NaN into NULL; make that explicit and the same on every backend.
    return None if value is None or not math.isfinite(value) else float(value)


def decision_record(row: Any) -> DecisionRecord:
    """A DecisionRecord from a `decisions` row (ORM object or mapping); held_image stays None."""
    get = row.__getitem__ if isinstance(row, dict) else lambda name: getattr(row, name)
    names = [f.name for f in fields(DecisionRecord) if f.init]
    values = {n: get(n) for n in names if n not in ("needs_review", "priority", "held_image")}
    for name in ("cosines", "scores", "special_cosines", "special_scores"):
        values[name] = decode_array(values[name], F32)
    values["embedding"] = decode_array(values["embedding"], F16)
    values["created_at"] = utc(values["created_at"])
    return DecisionRecord(**values)


def json_column(row: dict[str, Any], column: str) -> str:
    """JSON text of a JSON column of a decisions row; StorageError names the decision."""
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
    for name in _BINARY_COLUMNS:
        if row[name] is not None:
            row[name] = base64.b64decode(row[name])
    for name in _DATETIME_COLUMNS:
        row[name] = utc(datetime.fromisoformat(row[name]))
    return row
