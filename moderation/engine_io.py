"""A Moderator's way in and out: per-image metadata and pixel values checked before anything is
judged, error decisions for what could not be, and a batch's decisions handed to its log (live
records first, then their shadows)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moderation.decision import Decision, utcnow
from moderation.errors import ModerationError
from moderation.ids import new_decision_ids
from moderation.images import encode_png
from moderation.storage.errors import PartlyRecordedError
from moderation.storage.records import DecisionRecord, record_of
from moderation.storage.storable import check_metadata

if TYPE_CHECKING:
    from moderation.storage import DecisionLog
    from policy import CompiledPolicy

logger = logging.getLogger("moderation.engine")

Metadata = dict[str, Any] | Sequence[dict[str, Any]] | None


def batch_records(decisions: list[Decision], images: Any) -> list[DecisionRecord]:
    """The records of a batch: each live decision (with its held original when it goes to
    review and `images` are given), then every shadow decision, after the live ones they
    reference (the log writes in order: foreign keys hold). Shadows hold no original."""
    records = []
    for i, d in enumerate(decisions):
        held = None
        if images is not None and d.needs_review:
            held = encode_png(images[i])
        records.append(record_of(d, held))
    for d in decisions:
        records.extend(record_of(s) for s in d.shadows)
    return records


def write_batch(
    log: DecisionLog, decisions: list[Decision], images: Any
) -> tuple[list[str], str | None]:
    """Record the decisions (and their shadows); never raises (the images are moderated
    already). Returns the ids recorded nowhere and the problem, if any."""
    try:
        log.write(batch_records(decisions, images))
    except PartlyRecordedError as err:  # recorded, in the spool or without its original
        logger.error("%s", err)
        return [], str(err)
    except Exception as err:
        ids = getattr(err, "decision_ids", None) or [
            x.decision_id for d in decisions for x in (d, *d.shadows)
        ]
        reason = str(err) if isinstance(err, ModerationError) else f"{type(err).__name__}: {err}"
        logger.error("%d decisions were not recorded (%s): %s", len(ids), reason, ", ".join(ids))
        return ids, reason
    return [], None


def failure_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def given_pixels(pixel_values: torch.Tensor, n_images: int) -> torch.Tensor:
    """The caller's pixel values, checked to hold one row per image."""
    if not torch.is_tensor(pixel_values) or pixel_values.ndim < 2 or len(pixel_values) != n_images:
        raise ModerationError(
            f"pixel_values must be a tensor with one row for each of {n_images} images"
        )
    return pixel_values


def image_count(owners: torch.Tensor, views: Sequence | None) -> int:
    """How many images views belong to: len(views) when given, else the last owner + 1."""
    if views is not None:
        return len(views)
    return int(owners[-1]) + 1 if owners.numel() else 0


def per_image(metadata: Metadata, n: int) -> list[dict[str, Any]]:
    """One dict per image, each checked to be storable before any image is touched."""
    if metadata is None:
        return [{} for _ in range(n)]
    if isinstance(metadata, dict):
        # Refused before anything is acted on: metadata the log could not store (see README).
        check_metadata(metadata)
        return [dict(metadata) for _ in range(n)]
    metas = [dict(m) for m in metadata]
    if len(metas) != n:
        raise ModerationError(f"metadata has {len(metas)} entries for {n} images")
    for i, meta in enumerate(metas):
        check_metadata(meta, f"metadata[{i}]")
    return metas


def error_decisions(
    policy: CompiledPolicy, metas: Sequence[dict[str, Any]], message: str
) -> list[Decision]:
    """Decisions for images that could not be judged: verdict error, the policy's on_error action."""
    c, s = len(policy.concept_names), len(policy.special_names)
    nan_c, nan_s = np.full(c, np.nan, np.float32), np.full(s, np.nan, np.float32)
    ids, now = new_decision_ids(len(metas)), utcnow()  # one time per batch, ids in order
    return [
        Decision(
            verdict="error",
            action=policy.on_error,
            policy=policy,
            cosines=nan_c,
            scores=nan_c,
            special_cosines=nan_s,
            special_scores=nan_s,
            error=message,
            metadata=m,
            decision_id=decision_id,
            created_at=now,
        )
        for m, decision_id in zip(metas, ids, strict=True)
    ]
