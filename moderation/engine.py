"""Moderator: encode, score, decide, act and log, for a batch of images, in one pass on one device."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moderation.chunks import Chunk, join_results, split_call
from moderation.decision import Decision, decide
from moderation.errors import ModerationError
from moderation.images import (
    ImageBatch,
    ValueRange,
    batch_sha256,
    check_items,
    clip_preprocess,
    encode_png,
    to_image_batch,
)
from moderation.preprocess import judged_views
from moderation.scoring import score
from moderation.storage.errors import PartlyRecordedError
from moderation.storage.records import policy_record, record_of
from moderation.storage.storable import check_metadata

if TYPE_CHECKING:
    from moderation.encoder import ClipEncoder
    from moderation.storage import DecisionLog
    from policy import CompiledPolicy, Policy

logger = logging.getLogger(__name__)

Metadata = dict[str, Any] | Sequence[dict[str, Any]] | None


@dataclass
class ModerationResult:
    """The images as the caller may show them, and one decision per image.

    `unrecorded` lists the ids of decisions that are in neither the database nor the spool (a
    full disk, an unwritable spool while the database is down); `log_error` says what went wrong
    with recording this batch, including a batch that is only in the spool because the database
    refused it. The images are moderated either way.
    """

    images: Any  # same kind, layout, range and device as the input
    decisions: list[Decision]
    unrecorded: list[str] = field(default_factory=list)
    log_error: str | None = None

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
        # Every decision id this Moderator could not record, and why (see ModerationResult).
        self.unrecorded: list[str] = []
        self.log_errors: list[str] = []
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
        """Decide on every image, apply the actions (unless apply=False) and log the decisions.

        A large call is moderated in chunks (`moderation.chunks`: bounded pixels and views), so
        its memory is one chunk's whatever the batch size; the results come back as one. Bad
        input raises before anything is judged, except a file that fails to decode: it raises
        ImageInputError naming it, after the chunks before it were judged and logged.
        """
        if self.encoder is None:
            raise ModerationError("this Moderator has no image encoder; use moderate_embeddings")
        check_items(images, value_range)  # bad input fails before any chunk is judged
        chunks = split_call(images, value_range, self.policy.views, self.encoder.image_size)
        metas = _per_image(metadata, sum(c.count for c in chunks))
        if not chunks:
            return ModerationResult(to_image_batch(images).to_caller(), [])
        parts = [
            self._moderate_chunk(
                chunk, metas[chunk.start : chunk.start + chunk.count], value_range, apply
            )
            for chunk in chunks
        ]
        errors = list(dict.fromkeys(p.log_error for p in parts if p.log_error))
        return ModerationResult(
            join_results([p.images for p in parts], images),
            [d for p in parts for d in p.decisions],
            [i for p in parts for i in p.unrecorded],
            "; ".join(errors) or None,
        )

    def _moderate_chunk(
        self, chunk: Chunk, metas: list[dict[str, Any]], value_range: ValueRange, apply: bool
    ) -> ModerationResult:
        batch = to_image_batch(
            chunk.images, device=self.encoder.device, value_range=value_range, signed=chunk.signed
        )
        try:
            pixels, owners, views, view_errors = self._views(batch)
            embeddings = self.encoder.encode_image(pixels)  # [N, D]
            errors = [  # one host transfer for the batch
                e or v for e, v in zip(batch.input_errors(), view_errors, strict=True)
            ]
            decisions = self._decide(embeddings, metas, errors, owners=owners, views=views)
        except Exception as exc:  # fail closed: an image the engine could not judge is not clean
            logger.exception("moderation failed for a batch of %d images", len(batch))
            decisions = error_decisions(self.policy, metas, f"{type(exc).__name__}: {exc}")
        if self.log is not None or self.hash_images:
            for d, digest in zip(decisions, batch_sha256(batch.images), strict=True):
                d.image_sha256 = digest  # of the pixels judged, before any action
        moderated = self._act(batch.images, decisions) if apply else batch.images
        unrecorded, log_error = [], None
        if self.log is not None:
            unrecorded, log_error = self._log(decisions, batch.images)
        # Allowed images go back as the caller's own tensors, bit for bit.
        keep = torch.tensor([not apply or d.action == "allow" for d in decisions])
        images = batch.to_caller(moderated, keep=keep)
        return ModerationResult(images, decisions, unrecorded, log_error)

    def _views(
        self, batch: ImageBatch
    ) -> tuple[
        torch.Tensor, torch.Tensor | None, list[list[dict[str, Any]]] | None, list[str | None]
    ]:
        """CLIP pixel values of the views each image is judged on (the policy's `views` of each
        judged frame; under `center`, an animation's frames are centre-cropped too), which
        image each view belongs to (None: one view per image), the views' descriptions (None:
        CLIP's centre crop) and, per image, why it could not be covered (None: it was).

        Inputs that cannot be judged become NaN pixel rows, so they cannot score as clean.
        """
        encoder = self.encoder
        settings = {
            "size": encoder.image_size,
            "mean": encoder.image_mean,
            "std": encoder.image_std,
        }
        animated = any(f is not None for f in batch.frames)
        if self.policy.views == "center" and not animated:  # CLIP's own crop, bit for bit
            return clip_preprocess(batch, **settings), None, None, [None] * len(batch)
        frames = [batch.frames_of(i) for i in range(len(batch))]
        return judged_views(frames, batch.invalid, self.policy.views, **settings)

    def moderate_embeddings(
        self,
        embeddings: torch.Tensor,
        *,
        metadata: Metadata = None,
        owners: torch.Tensor | None = None,
        views: Sequence[list[dict[str, Any]] | None] | None = None,
    ) -> list[Decision]:
        """Decide from precomputed embeddings (replay, backtests); logs like moderate().

        embeddings: [B, D], one per image; or [N, D] views of images with `owners` [N] naming
        each row's image (non-decreasing), and optionally `views` describing them per image.
        """
        embeddings = torch.as_tensor(embeddings).to(self.policy.device)
        n_images = embeddings.shape[0] if owners is None else _image_count(owners, views)
        decisions = self._decide(
            embeddings, _per_image(metadata, n_images), owners=owners, views=views
        )
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
        *,
        owners: torch.Tensor | None = None,
        views: Sequence[list[dict[str, Any]] | None] | None = None,
    ) -> list[Decision]:
        embeddings = embeddings.float()  # scores in float32 whatever the tower's dtype
        if owners is not None:
            owners = owners.to(embeddings.device)
        scores = score(self.policy, embeddings, owners, len(metas))
        return decide(
            self.policy,
            scores,
            errors=errors,
            embeddings=embeddings if self.store_embeddings else None,
            metadata=metas,
            owners=owners,
            views=views,
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

    def _log(self, decisions: list[Decision], images) -> tuple[list[str], str | None]:
        """Record the decisions; never raises (the images are moderated already). Returns the ids
        recorded nowhere and the problem, if any; both are also kept on the Moderator."""
        try:
            records = []
            for i, d in enumerate(decisions):
                held = None
                if images is not None and d.needs_review:
                    held = encode_png(images[i])
                records.append(record_of(d, held))
            self.log.write(records)
        except PartlyRecordedError as err:  # recorded, in the spool or without its original
            logger.error("%s", err)
            self.log_errors.append(str(err))
            return [], str(err)
        except Exception as err:
            ids = getattr(err, "decision_ids", None) or [d.decision_id for d in decisions]
            reason = (
                str(err) if isinstance(err, ModerationError) else f"{type(err).__name__}: {err}"
            )
            logger.error(
                "%d decisions were not recorded (%s): %s", len(ids), reason, ", ".join(ids)
            )
            self.unrecorded += ids
            self.log_errors.append(reason)
            return ids, reason
        return [], None

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


def _image_count(owners: torch.Tensor, views: Sequence | None) -> int:
    """How many images views belong to: len(views) when given, else the last owner + 1."""
    if views is not None:
        return len(views)
    return int(owners[-1]) + 1 if owners.numel() else 0


def _per_image(metadata: Metadata, n: int) -> list[dict[str, Any]]:
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
