"""Moderator: encode, score, decide, act and log, for a batch of images, in one pass on one device."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moderation.chunks import Chunk, join_results, split_call
from moderation.decision import Decision, decide, error_decisions
from moderation.errors import ModerationError
from moderation.image_checks import check_items
from moderation.images import (
    ImageBatch,
    ValueRange,
    batch_sha256,
    encode_png,
    to_image_batch,
)
from moderation.loading import load_compiled
from moderation.preprocess import batch_views
from moderation.scoring import score
from moderation.shadow import ShadowCandidates, load_candidates
from moderation.storage.errors import PartlyRecordedError
from moderation.storage.records import DecisionRecord, policy_record, record_of
from moderation.storage.storable import Metadata, per_image

if TYPE_CHECKING:
    from moderation.encoder import ClipEncoder
    from moderation.storage import DecisionLog
    from policy import CompiledPolicy, Policy

logger = logging.getLogger(__name__)


@dataclass
class ModerationResult:
    """The images as the caller may show them, and one decision per image.

    `shadow` lists, per image, the shadow candidates' decisions (`Decision.shadows`: what each
    candidate would have decided, in candidate order; empty lists without candidates).

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

    @property
    def shadow(self) -> list[list[Decision]]:
        return [list(d.shadows) for d in self.decisions]


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
        shadow: Sequence[CompiledPolicy] = (),
    ) -> None:
        """shadow: candidate policies scored beside `policy` on its embeddings and logged as
        its decisions' shadows, never acted on (`moderation.shadow`); each must be compiled for
        the same model and judge the same views, or ModerationError names it."""
        if encoder is not None and policy.embed_dim != encoder.embed_dim:
            raise ModerationError(
                f"policy {policy.name!r} has {policy.embed_dim}-wide embeddings but model "
                f"{encoder.model_id!r} projects to {encoder.embed_dim}: compile it for this model"
            )
        self.encoder = encoder
        device = encoder.device if encoder is not None else policy.device
        self.policy = policy.to(device)
        self.shadows = ShadowCandidates(self.policy, shadow)
        self.log = log
        self.store_embeddings = store_embeddings
        # Every decision id this Moderator could not record, and why (see ModerationResult).
        self.unrecorded: list[str] = []
        self.log_errors: list[str] = []
        # Without a log, Decision.image_sha256 costs a host copy per batch: only when asked.
        self.hash_images = hash_images
        if log is not None:
            log.register_policy(policy_record(self.policy))
            for candidate in self.shadows.policies:
                log.register_policy(policy_record(candidate))

    @property
    def shadow_policies(self) -> tuple[CompiledPolicy, ...]:
        """The shadow candidates, in the order of every `Decision.shadows`."""
        return self.shadows.policies

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
        shadow: Sequence[str | Path | Policy | CompiledPolicy] = (),
        expect_digest: str | None = None,
    ) -> Moderator:
        """Load a policy (YAML, compiled artifact or object) and its model; log to `db` if given.

        shadow: candidates (paths or objects, loaded like the policy; YAML compiled with its
        model) scored on live traffic beside it and logged, never acted on. expect_digest: the
        compiled policy's sha256 digest, pinned (anything else is refused)."""
        compiled, encoder = load_compiled(
            policy,
            model=model,
            device=device,
            dtype=dtype,
            text_model=text_model,
            expect_digest=expect_digest,
        )
        return cls.build(
            compiled, encoder, db=db, spool_dir=spool_dir, held_dir=held_dir, shadow=shadow
        )

    @classmethod
    def build(
        cls,
        policy: CompiledPolicy,
        encoder: Any,
        *,
        db: str | None = None,
        spool_dir: str | Path | None = None,
        held_dir: str | Path | None = None,
        shadow: Sequence[str | Path | Policy | CompiledPolicy] = (),
    ) -> Moderator:
        """How every entry point builds its Moderator (`from_policy`, the diffusers checker's
        constructors and `log_to`): shadow candidates loaded (YAML compiled with `encoder`) and
        checked before the database at `db` is opened."""
        candidates = load_candidates(shadow, encoder)
        ShadowCandidates(policy, candidates)  # refuse a misfit before opening the database
        log = None
        if db is not None:
            from moderation.storage import DecisionLog

            log = DecisionLog(db, spool_dir=_path(spool_dir), held_dir=_path(held_dir))
        return cls(policy, encoder, log=log, shadow=candidates)

    # -- moderation ---------------------------------------------------------------------------

    def moderate(
        self,
        images: Any,
        *,
        metadata: Metadata = None,
        value_range: ValueRange = "auto",
        apply: bool = True,
        pixel_values: torch.Tensor | None = None,
    ) -> ModerationResult:
        """Decide on every image, apply the actions (unless apply=False) and log the decisions.

        A large call is moderated in chunks (`moderation.chunks`: bounded pixels and views), so
        its memory is one chunk's whatever the batch size; the results come back as one. Bad
        input raises before anything is judged, except a file that fails to decode: it raises
        ImageInputError naming it, after the chunks before it were judged and logged.

        pixel_values: [B, 3, S, S] CLIP pixels the caller made of these images (diffusers' feature
        extractor), judged instead of views of `images` (still acted on, hashed and held); only
        under `compat: diffusers`, whose coverage is that centre crop: others build their views.
        """
        if self.encoder is None:
            raise ModerationError("this Moderator has no image encoder; use moderate_embeddings")
        if pixel_values is not None and self.policy.compat != "diffusers":
            raise ModerationError(
                f"policy {self.policy.name!r} judges every pixel of an image, so it builds its "
                "own views: pass pixel_values only with a `compat: diffusers` policy"
            )
        check_items(images, value_range)  # bad input fails before any chunk is judged
        chunks = split_call(images, value_range, self.policy.views, self.encoder.image_size)
        metas = per_image(metadata, sum(c.count for c in chunks))
        if pixel_values is not None:
            pixel_values = _given_pixels(pixel_values, len(metas))
        if not chunks:
            return ModerationResult(to_image_batch(images).to_caller(), [])
        parts = [
            self._moderate_chunk(
                chunk,
                metas[chunk.start : chunk.start + chunk.count],
                value_range,
                apply,
                None
                if pixel_values is None
                else pixel_values[chunk.start : chunk.start + chunk.count],
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
        self,
        chunk: Chunk,
        metas: list[dict[str, Any]],
        value_range: ValueRange,
        apply: bool,
        pixel_values: torch.Tensor | None = None,
    ) -> ModerationResult:
        batch = to_image_batch(
            chunk.images, device=self.encoder.device, value_range=value_range, lowest=chunk.lowest
        )
        try:
            if pixel_values is None:
                pixels, owners, views, view_errors = batch_views(
                    batch,
                    self.policy.views,
                    size=self.encoder.image_size,
                    mean=self.encoder.image_mean,
                    std=self.encoder.image_std,
                )
            else:  # the caller's own pixels, one view per image
                pixels, owners, views, view_errors = pixel_values, None, None, [None] * len(batch)
            embeddings = self.encoder.encode_image(pixels)  # [N, D]
            errors = [  # one host transfer for the batch
                e or v for e, v in zip(batch.input_errors(), view_errors, strict=True)
            ]
        except Exception as exc:  # fail closed: an image the engine could not judge is not clean
            logger.exception("moderation failed for a batch of %d images", len(batch))
            return self.after_encoder(batch, None, metas, apply, failure=_failure_text(exc))
        return self.after_encoder(batch, embeddings, metas, apply, errors, owners, views)

    def after_encoder(
        self,
        batch: ImageBatch,
        embeddings: torch.Tensor | None,
        metas: list[dict[str, Any]],
        apply: bool = True,
        errors: list[str | None] | None = None,
        owners: torch.Tensor | None = None,
        views: Sequence[list[dict[str, Any]] | None] | None = None,
        *,
        failure: str | None = None,
    ) -> ModerationResult:
        """Everything moderate() does once the encoder ran: score and decide (the live policy,
        then its shadow candidates), hash, act, log, and the images as the caller gets them.
        embeddings None (with `failure`): the batch could not be encoded; all are errors."""
        if failure is None:
            try:
                embeddings = embeddings.float()  # scores in float32 whatever the tower's dtype
                decisions = self._decide(embeddings, metas, errors, owners=owners, views=views)
            except Exception as exc:  # fail closed, as in moderate()
                logger.exception("moderation failed for a batch of %d images", len(batch))
                failure = _failure_text(exc)
        if failure is not None:
            embeddings, decisions = None, error_decisions(self.policy, metas, failure)
        self.shadows.attach(decisions, embeddings, owners)  # never acts, never raises
        self._stamp(decisions, batch.value_ranges())
        if self.log is not None or self.hash_images:
            for d, digest in zip(decisions, batch_sha256(batch.images), strict=True):
                d.image_sha256 = digest  # of the pixels judged, before any action
                for s in d.shadows:
                    s.image_sha256 = digest
        moderated = self._act(batch.images, decisions) if apply else batch.images
        unrecorded, log_error = [], None
        if self.log is not None:
            unrecorded, log_error = self._log(decisions, batch.images)
        # Allowed images go back as the caller's own tensors, bit for bit.
        keep = torch.tensor([not apply or d.action == "allow" for d in decisions])
        images = batch.to_caller(moderated, keep=keep)
        return ModerationResult(images, decisions, unrecorded, log_error)

    def _stamp(self, decisions: list[Decision], readings: Sequence[str | None]) -> None:
        """Record on each decision (and its shadows) how its input's values were read and which
        encoder embedded it, so an audit can tell what judged the image."""
        digest = getattr(self.encoder, "digest", None)
        for d, reading in zip(decisions, readings, strict=True):
            for x in (d, *d.shadows):
                x.value_range, x.encoder_digest = reading, digest

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
        embeddings = torch.as_tensor(embeddings).to(self.policy.device).float()
        n_images = embeddings.shape[0] if owners is None else _image_count(owners, views)
        if owners is not None:
            owners = owners.to(embeddings.device)
        decisions = self._decide(
            embeddings, per_image(metadata, n_images), owners=owners, views=views
        )
        self.shadows.attach(decisions, embeddings, owners)
        if self.log is not None:
            self._log(decisions, None)
        return decisions

    __call__ = moderate

    def fail(self, messages: Sequence[str], *, metadata: Metadata = None) -> list[Decision]:
        """Error decisions for images that could not even be read; logged like any other."""
        metas = per_image(metadata, len(messages))
        decisions = error_decisions(self.policy, metas, "")  # one time for the batch
        for d, message in zip(decisions, messages, strict=True):
            d.error = message
        self.shadows.attach(decisions, None)
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
        # embeddings: float32 (moderate_embeddings and after_encoder convert them once)
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
        from moderation.actions import apply_actions, policy_settings

        actions = [d.action for d in decisions]
        if all(a == "allow" for a in actions):
            return images
        try:
            return apply_actions(images, actions, **policy_settings(self.policy))
        except Exception:  # fail closed: black out whatever should not be shown as it is
            logger.exception("applying actions failed; blacking out every non-allowed image")
            return apply_actions(images, ["allow" if a == "allow" else "blackout" for a in actions])

    # -- logging and review ------------------------------------------------------------------

    def _log(self, decisions: list[Decision], images) -> tuple[list[str], str | None]:
        """Record the decisions and their shadows (`write_batch`: never raises); the ids
        recorded nowhere and the problem are also kept on the Moderator."""
        unrecorded, error = write_batch(self.log, decisions, images)
        self.unrecorded += unrecorded
        if error is not None:
            self.log_errors.append(error)
        return unrecorded, error

    def to(self, device: torch.device | str) -> Moderator:
        """Move the policy to `device`, after the encoder moved there (a diffusers pipeline's
        `.to()`); the encoder is its owner's to move."""
        self.policy = self.policy.to(device)
        self.shadows.to(device)
        return self

    def close(self) -> None:
        if self.log is not None:
            self.log.close()

    def __enter__(self) -> Moderator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- a batch's way in and out ----------------------------------------------------------------


def _failure_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _given_pixels(pixel_values: torch.Tensor, n_images: int) -> torch.Tensor:
    """The caller's pixel values, checked to hold one row per image."""
    if not torch.is_tensor(pixel_values) or pixel_values.ndim < 2 or len(pixel_values) != n_images:
        raise ModerationError(
            f"pixel_values must be a tensor with one row for each of {n_images} images"
        )
    return pixel_values


def _image_count(owners: torch.Tensor, views: Sequence | None) -> int:
    """How many images views belong to: len(views) when given, else the last owner + 1."""
    if views is not None:
        return len(views)
    return int(owners[-1]) + 1 if owners.numel() else 0


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


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)
