"""Moderator: encode, score, decide, act and log, for a batch of images, in one pass on one device."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moderation.decision import Decision, decide
from moderation.errors import ModerationError
from moderation.images import ValueRange, batch_sha256, clip_preprocess, encode_png, to_image_batch
from moderation.scoring import score
from moderation.storage.records import policy_record, record_of

if TYPE_CHECKING:
    from moderation.encoder import ClipEncoder
    from moderation.storage import DecisionLog
    from policy import CompiledPolicy, Policy

logger = logging.getLogger(__name__)

Metadata = dict[str, Any] | Sequence[dict[str, Any]] | None


@dataclass
class ModerationResult:
    """The images as the caller may show them, and one decision per image."""

    images: Any  # same kind, layout, range and device as the input
    decisions: list[Decision]

    @property
    def flagged(self) -> list[bool]:
        return [d.flagged for d in self.decisions]


class Moderator:
    """Applies one compiled policy to batches of images (or embeddings) and logs every decision."""

    def __init__(
        self,
        policy: CompiledPolicy,
        encoder: ClipEncoder | None = None,
        *,
        log: DecisionLog | None = None,
        store_embeddings: bool = True,
        hash_images: bool = False,
    ) -> None:
        if encoder is not None and policy.embed_dim != encoder.embed_dim:
            raise ModerationError(
                f"policy {policy.name!r} has {policy.embed_dim}-wide embeddings but model "
                f"{encoder.model_id!r} projects to {encoder.embed_dim}: compile it for this model"
            )
        self.encoder = encoder
        device = encoder.device if encoder is not None else policy.device
        self.policy = policy.to(device)
        self.log = log
        self.store_embeddings = store_embeddings
        # Without a log, Decision.image_sha256 costs a host copy per batch: only when asked.
        self.hash_images = hash_images
        if log is not None:
            log.register_policy(policy_record(self.policy))

    @classmethod
    def from_policy(
        cls,
        policy: str | Path | Policy | CompiledPolicy,
        *,
        model: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        text_model: str | Path | None = None,
        db: str | None = None,
        spool_dir: str | Path | None = None,
        held_dir: str | Path | None = None,
    ) -> Moderator:
        """Load a policy (YAML, compiled artifact or object) and its model; log to `db` if given."""
        compiled, encoder = load_compiled(
            policy, model=model, device=device, dtype=dtype, text_model=text_model
        )
        log = None
        if db is not None:
            from moderation.storage import DecisionLog

            log = DecisionLog(db, spool_dir=spool_dir, held_dir=held_dir)
        return cls(compiled, encoder, log=log)

    # -- moderation ---------------------------------------------------------------------------

    def moderate(
        self,
        images: Any,
        *,
        metadata: Metadata = None,
        value_range: ValueRange = "auto",
        apply: bool = True,
    ) -> ModerationResult:
        """Decide on every image, apply the actions (unless apply=False) and log the decisions."""
        if self.encoder is None:
            raise ModerationError("this Moderator has no image encoder; use moderate_embeddings")
        batch = to_image_batch(images, device=self.encoder.device, value_range=value_range)
        metas = _per_image(metadata, len(batch))
        if len(batch) == 0:
            return ModerationResult(batch.to_caller(), [])
        try:
            # Non-finite inputs become NaN pixel rows here, so they cannot score as clean.
            pixels = clip_preprocess(
                batch,
                size=self.encoder.image_size,
                mean=self.encoder.image_mean,
                std=self.encoder.image_std,
            )
            embeddings = self.encoder.encode_image(pixels)  # [B, D]
            errors: list[str | None] = [None] * len(batch)
            for i in batch.invalid_indices():  # one host sync for the batch
                errors[i] = "the input image holds NaN or infinite values"
            decisions = self._decide(embeddings, metas, errors)
        except Exception as exc:  # fail closed: an image the engine could not judge is not clean
            logger.exception("moderation failed for a batch of %d images", len(batch))
            decisions = error_decisions(self.policy, metas, f"{type(exc).__name__}: {exc}")
        if self.log is not None or self.hash_images:
            for d, digest in zip(decisions, batch_sha256(batch.images), strict=True):
                d.image_sha256 = digest  # of the pixels judged, before any action
        moderated = self._act(batch.images, decisions) if apply else batch.images
        if self.log is not None:
            self._log(decisions, batch.images)
        # Allowed images go back as the caller's own tensors, bit for bit.
        keep = torch.tensor([not apply or d.action == "allow" for d in decisions])
        return ModerationResult(batch.to_caller(moderated, keep=keep), decisions)

    def moderate_embeddings(
        self, embeddings: torch.Tensor, *, metadata: Metadata = None
    ) -> list[Decision]:
        """Decide from precomputed image embeddings [B, D] (replay, backtests); logs like moderate()."""
        embeddings = torch.as_tensor(embeddings).to(self.policy.device)
        decisions = self._decide(embeddings, _per_image(metadata, embeddings.shape[0]))
        if self.log is not None:
            self._log(decisions, None)
        return decisions

    __call__ = moderate

    def fail(self, messages: Sequence[str], *, metadata: Metadata = None) -> list[Decision]:
        """Error decisions for images that could not even be read; logged like any other."""
        metas = _per_image(metadata, len(messages))
        decisions = [
            error_decisions(self.policy, [m], msg)[0]
            for m, msg in zip(metas, messages, strict=True)
        ]
        if self.log is not None and decisions:
            self._log(decisions, None)
        return decisions

    def _decide(
        self,
        embeddings: torch.Tensor,
        metas: list[dict[str, Any]],
        errors: list[str | None] | None = None,
    ) -> list[Decision]:
        embeddings = embeddings.float()  # scores in float32 whatever the tower's dtype
        scores = score(self.policy, embeddings)
        return decide(
            self.policy,
            scores,
            errors=errors,
            embeddings=embeddings if self.store_embeddings else None,
            metadata=metas,
        )

    def _act(self, images, decisions: list[Decision]):
        from moderation.actions import apply_actions

        actions = [d.action for d in decisions]
        if all(a == "allow" for a in actions):
            return images
        p = self.policy
        try:
            return apply_actions(
                images,
                actions,
                blur_radius=p.blur_radius,
                pixelate_block=p.pixelate_block,
                review_placeholder=p.review_placeholder,
            )
        except Exception:  # fail closed: black out whatever should not be shown as it is
            logger.exception("applying actions failed; blacking out every non-allowed image")
            return apply_actions(images, ["allow" if a == "allow" else "blackout" for a in actions])

    # -- logging and review ------------------------------------------------------------------

    def _log(self, decisions: list[Decision], images) -> None:
        records = []
        for i, d in enumerate(decisions):
            held = None
            if images is not None and d.needs_review:
                held = encode_png(images[i])
            records.append(record_of(d, held))
        self.log.write(records)

    def release(self, decision_id: str) -> bytes:
        """The held original (PNG bytes) of a reviewed decision, once a reviewer approved it."""
        if self.log is None:
            raise ModerationError("this Moderator logs no decisions, so it holds no images")
        from moderation.review import ReviewQueue

        self.log.flush()  # a decision still queued for writing is not in the database yet
        return ReviewQueue(self.log.url).release(decision_id, self.log.held)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()

    def __enter__(self) -> Moderator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_any_policy(path: str | Path) -> Policy | CompiledPolicy:
    """A YAML policy, or a compiled artifact (.safetensors) written by `moderation policy compile`."""
    from policy import CompiledPolicy, load_policy

    path = Path(path)
    if path.suffix == ".safetensors":
        return CompiledPolicy.load(path)
    return load_policy(path)


def load_compiled(
    policy: str | Path | Policy | CompiledPolicy,
    *,
    model: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    text_model: str | Path | None = None,
) -> tuple[CompiledPolicy, ClipEncoder]:
    """A compiled policy and the encoder it runs with, from a YAML or artifact path or an object.

    The model is `model`, else the policy's own: a relative folder is relative to the policy's
    file (or the artifact's), as the loader reads it. A YAML policy is compiled for that model,
    which checks every embedding's width against it.
    """
    from moderation.encoder import ClipEncoder
    from policy import CompiledPolicy, compile_policy

    default = None
    if isinstance(policy, (str, Path)):
        path = Path(policy)
        policy = load_any_policy(path)
        if isinstance(policy, CompiledPolicy):
            beside = path.parent / policy.model
            default = str(beside.resolve()) if beside.is_dir() else None
    if isinstance(policy, CompiledPolicy):
        default = default or policy.model
    else:
        default = policy.resolved_model
    encoder = ClipEncoder.from_pretrained(
        model or default, device=device, dtype=dtype, text_model=text_model
    )
    compiled = policy if isinstance(policy, CompiledPolicy) else compile_policy(policy, encoder)
    return compiled, encoder


def _per_image(metadata: Metadata, n: int) -> list[dict[str, Any]]:
    """One dict per image, each checked to be storable before any image is touched."""
    from moderation.metadata import check_metadata

    if metadata is None:
        return [{} for _ in range(n)]
    if isinstance(metadata, dict):
        check_metadata(metadata)
        return [dict(metadata) for _ in range(n)]
    metas = [dict(m) for m in metadata]
    if len(metas) != n:
        raise ModerationError(f"metadata has {len(metas)} entries for {n} images")
    for i, meta in enumerate(metas):
        check_metadata(meta, f"metadata[{i}]")
    return metas


def error_decisions(
    policy: CompiledPolicy, metas: list[dict[str, Any]], message: str
) -> list[Decision]:
    """Decisions for images that could not be judged: verdict error, the policy's on_error action."""
    c, s = len(policy.concept_names), len(policy.special_names)
    nan_c, nan_s = np.full(c, np.nan, np.float32), np.full(s, np.nan, np.float32)
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
        )
        for m in metas
    ]
