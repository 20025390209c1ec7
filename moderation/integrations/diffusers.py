"""The diffusers integration: `moderate_pipeline` around any pipeline, and PolicySafetyChecker,
a policy in the `safety_checker` slot of a diffusers pipeline.

A thin adapter over `Moderator`: called like `StableDiffusionSafetyChecker`
(`checker(images=..., clip_input=...)` returns `(images, has_nsfw_concepts)`), every image gets a
`Decision` (kept in `last_decisions`, logged with `db=`), the policy's action instead of always
black, and any failure gives `on_error` for the whole batch. It saves and loads with its pipeline.
With `shadow=[candidate, ...]` the candidates are scored on the same embeddings and logged as
shadow decisions (`last_shadow_decisions`), never acted on (`moderation.shadow`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# diffusers saves and loads a pipeline component whose class derives from one of its known bases,
# and looks that base up by name in the component's own module: keep `ModelMixin` imported here.
from diffusers import ModelMixin
from torch import nn

from moderation.decision import Decision
from moderation.engine import Moderator
from moderation.errors import ModerationError
from moderation.integrations.pipeline import ModeratedPipeline
from moderation.integrations.slot import (
    HoldsModerator,
    SlotClass,
    caller_block,
    caller_metadata,
    device_of_map,
)
from moderation.integrations.slot_images import (
    act_in_place,
    as_shown,
    blackout_in_place,
    colour_channels,
    count_images,
    with_extra,
)
from moderation.integrations.towers import ModuleEncoder, VisionTower, module_device
from policy.compiled import CompiledPolicy

__all__ = ["PolicySafetyChecker", "moderate_pipeline"]

logger = logging.getLogger(__name__)


class PolicySafetyChecker(ModelMixin, HoldsModerator, metaclass=SlotClass):
    """A drop-in `safety_checker`: same call and return as diffusers', decisions from a policy."""

    unlogged_warning = (
        "moderation: %d images need review but this checker logs no decisions, so no "
        "reviewer will see them: build it with db=URL or call checker.log_to(URL)"
    )

    main_input_name = "clip_input"
    stands_in_for = (
        (
            "diffusers.pipelines.stable_diffusion.safety_checker",
            "StableDiffusionSafetyChecker",
        ),
    )

    def __init__(
        self,
        compiled_policy: CompiledPolicy,
        encoder: Any,
        *,
        log: Any = None,
        metadata: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        shadow: Sequence[CompiledPolicy] = (),
    ) -> None:
        """encoder: an `nn.Module` with `encode_image`, or anything holding `vision_model` and
        `visual_projection` (a `ClipEncoder`, diffusers' own checker), whose modules are shared.
        log: a `moderation.storage.DecisionLog` that every decision is written to.
        shadow: compiled candidates of the policy's model and views, scored and logged beside it."""
        super().__init__()
        if not (isinstance(encoder, nn.Module) and hasattr(encoder, "encode_image")):
            encoder = VisionTower.of(encoder)
        self.encoder = encoder
        policy = compiled_policy.to(module_device(encoder, compiled_policy.device))
        self._engine_encoder = ModuleEncoder(encoder, policy)
        self.moderator = Moderator(policy, self._engine_encoder, log=log, shadow=shadow)
        self.metadata = metadata  # caller metadata logged with every image of every call
        self.last_decisions: list[Decision] = []
        self.last_unrecorded: list[str] = []  # ids of last_decisions in neither database nor spool
        self._warned_unlogged = False

    # -- building ----------------------------------------------------------------------------

    @classmethod
    def from_policy(
        cls,
        path: str | Path,
        model: str | Path | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        text_model: str | Path | None = None,
        db: str | None = None,
        held_dir: str | Path | None = None,
        spool_dir: str | Path | None = None,
        metadata: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        shadow: Sequence[str | Path | CompiledPolicy] = (),
        expect_digest: str | None = None,
    ) -> PolicySafetyChecker:
        """Load a policy YAML (compiled with model or its own `model:`) or a compiled artifact;
        log every decision to `db` if given. shadow: candidates (YAML compiled with the same
        model, or artifacts of it) scored and logged beside the policy, never acted on.
        expect_digest: the compiled policy's sha256 digest, pinned."""
        from moderation.loading import load_compiled
        from moderation.shadow import load_candidates

        compiled, encoder = load_compiled(
            path,
            model=model,
            device=device,
            dtype=dtype,
            text_model=text_model,
            expect_digest=expect_digest,
        )
        candidates = load_candidates(shadow, encoder)  # YAML: compiled with the text tower
        checker = cls(compiled, VisionTower.of(encoder), metadata=metadata)
        return checker._log_with(db, held_dir, spool_dir, candidates)

    @classmethod
    def from_checker(
        cls,
        checker: nn.Module,
        policy: CompiledPolicy | None = None,
        *,
        db: str | None = None,
        held_dir: str | Path | None = None,
        spool_dir: str | Path | None = None,
        metadata: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        shadow: Sequence[CompiledPolicy] = (),
    ) -> PolicySafetyChecker:
        """Wrap a loaded `StableDiffusionSafetyChecker`: its own concepts unless a policy is given.

        The vision tower is shared, not copied, so `pipe.safety_checker = from_checker(
        pipe.safety_checker)` costs no memory and flags what diffusers flags.
        """
        from moderation.integrations.sd_checker import CheckerTensors, checker_policy

        if policy is None:
            tensors = CheckerTensors(
                checker.concept_embeds.detach().float(),
                checker.concept_embeds_weights.detach().float(),
                checker.special_care_embeds.detach().float(),
                checker.special_care_embeds_weights.detach().float(),
                source=type(checker).__name__,
            )
            model = getattr(checker.config, "_name_or_path", "") or "safety_checker"
            policy = checker_policy(tensors, name="sd-safety-checker", model=model)
        built = cls(policy, checker, metadata=metadata)
        return built._log_with(db, held_dir, spool_dir, shadow)

    def log_to(
        self,
        db: str,
        *,
        held_dir: str | Path | None = None,
        spool_dir: str | Path | None = None,
    ) -> PolicySafetyChecker:
        """Log every decision from now on to `db` (held originals in held_dir, default
        $MODERATION_HELD_DIR or ./held; spool in spool_dir, default $MODERATION_SPOOL_DIR or ./spool)."""
        previous = self.moderator.log
        self._log_with(db, held_dir, spool_dir, self.moderator.shadow_policies)
        if previous is not None:
            previous.close()
        return self

    def _log_with(
        self, db: str | None, held_dir: Any, spool_dir: Any, shadow: Sequence[Any]
    ) -> PolicySafetyChecker:
        """A new Moderator over this checker's policy and encoder (`Moderator.build`)."""
        self.moderator = Moderator.build(
            self.policy,
            self._engine_encoder,
            db=db,
            held_dir=held_dir,
            spool_dir=spool_dir,
            shadow=shadow,
        )
        return self

    # -- saving and loading with a pipeline --------------------------------------------------

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Write the compiled policy and the vision tower into save_directory (see pretrained)."""
        from moderation.integrations.pretrained import save_checker

        if kwargs.get("push_to_hub"):
            raise ModerationError("a PolicySafetyChecker is saved to a folder, not pushed to a hub")
        save_checker(
            save_directory,
            self.policy,
            self.encoder,
            class_name=type(self).__name__,
            logged=self.moderator.log is not None,
            shadow=self.moderator.shadow_policies,
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        db: str | None = None,
        held_dir: str | Path | None = None,
        spool_dir: str | Path | None = None,
        metadata: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        expect_digest: str | None = None,
        expect_encoder_digest: str | None = None,
        **loading: Any,
    ) -> PolicySafetyChecker:
        """Load a folder written by save_pretrained (on the CPU in float32 unless told; diffusers'
        torch_dtype and device_map are honoured, its other loading options do not apply).

        expect_digest / expect_encoder_digest: the policy's and the encoder's sha256 digests
        this folder must hold (anything else is refused), since whoever can rewrite the folder
        can rewrite its manifest too."""
        from moderation.integrations.pretrained import load_checker, load_shadow

        dtype = dtype or loading.get("torch_dtype")
        device = device or device_of_map(loading.get("device_map"))
        policy, encoder, manifest = load_checker(
            pretrained_model_name_or_path,
            device=device,
            dtype=dtype,
            expect_digest=expect_digest,
            expect_encoder_digest=expect_encoder_digest,
        )
        shadow = load_shadow(pretrained_model_name_or_path, manifest)
        if db is None and manifest.get("logged"):
            logger.warning(
                "moderation: the checker saved in %s logged its decisions; its database URL is "
                "not saved: call checker.log_to(URL) (pipe.safety_checker.log_to(URL)) to log again",
                pretrained_model_name_or_path,
            )
        checker = cls(policy, VisionTower.of(encoder), metadata=metadata)
        return checker._log_with(db, held_dir, spool_dir, shadow)

    # -- what a pipeline reads ---------------------------------------------------------------

    @property
    def policy(self) -> CompiledPolicy:
        """The compiled policy, on the encoder's device."""
        return self.moderator.policy

    @property
    def last_shadow_decisions(self) -> list[list[Decision]]:
        """Per image of the last call, the shadow candidates' decisions (candidate order)."""
        return [list(d.shadows) for d in self.last_decisions]

    @property
    def device(self) -> torch.device:
        """The encoder's device (diffusers' pipeline reads it from every component)."""
        return module_device(self.encoder, self.policy.device)

    @property
    def dtype(self) -> torch.dtype:
        """The encoder's dtype (diffusers' `pipe.dtype` may read it from this component)."""
        param = next(self.encoder.parameters(), None)
        return param.dtype if param is not None else torch.float32

    def _apply(self, fn, recurse=True):
        """Follow `.to()`/`.cuda()`: the policy is a dataclass, not parameters; it stays float32."""
        super()._apply(fn, recurse)
        moved = fn(torch.empty(0, device=self.policy.device))
        self.moderator.to(moved.device)
        return self

    # -- caller metadata ---------------------------------------------------------------------

    def caller(self, **metadata: Any) -> contextlib.AbstractContextManager[PolicySafetyChecker]:
        """Metadata (prompt, seed, user, ...) logged with every image moderated inside the block,
        over `checker.metadata`: `with checker.caller(prompt=p, user=u): pipe(p)`."""
        return caller_block(self, metadata)

    def _call_metadata(self) -> Any:
        """This call's metadata: `checker.metadata` (one mapping, or one per image) + caller()."""
        extra = caller_metadata(self)
        base = self.metadata
        if base is None or isinstance(base, Mapping):
            return {**(base or {}), **extra}
        if isinstance(base, Sequence) and not isinstance(base, (str, bytes)):
            return [{**m, **extra} for m in base]
        return base  # not metadata: the Moderator refuses it, and the batch fails closed

    # -- moderation --------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, clip_input: torch.Tensor | None = None, images: Any = None):
        """Moderate a batch; flagged images are changed in place; returns (images, flags)."""
        count = count_images(images)
        metadata = self._call_metadata()
        self.last_unrecorded = []
        images, extra = colour_channels(images)  # RGB-D (LDM3D): the colour is what is shown
        try:
            decisions = self._decide(clip_input, images, metadata, count)
        except Exception as exc:  # fail closed: whatever went wrong, no image goes out unjudged
            logger.exception("moderation failed for a batch of %d images", count)
            decisions = self._fail(count, f"{type(exc).__name__}: {exc}", metadata)
        self.last_decisions = decisions
        # An error decision is never shown as it is, whatever its action says.
        actions = [
            "blackout" if d.verdict == "error" and d.action == "allow" else d.action
            for d in decisions
        ]
        has_nsfw_concepts = [a != "allow" for a in actions]
        flagged = [i for i, hit in enumerate(has_nsfw_concepts) if hit]
        if flagged:
            images = self._act(images, flagged, [actions[i] for i in flagged])
            # One line per batch, like diffusers, but saying what happened to which image and why.
            reasons = "; ".join(
                f"{i}: {decisions[i].action} ({_reason(decisions[i])})" for i in flagged
            )
            logger.warning(
                "moderation: %d of %d images changed by policy %s: %s",
                len(flagged),
                len(decisions),
                self.policy.name,
                reasons,
            )
        self._warn_if_unreviewed(decisions)
        return with_extra(images, extra, flagged), has_nsfw_concepts

    def _decide(self, clip_input: Any, images: Any, metadata: Any, count: int) -> list[Decision]:
        """The Moderator's decisions: on `clip_input` under `compat: diffusers` (diffusers' own
        centre crop, for parity), else on views of `images`, the full output the user sees."""
        shown, value_range = as_shown(images)
        compat = self.policy.compat == "diffusers"
        if compat and clip_input is None:
            raise ModerationError("a `compat: diffusers` policy judges clip_input: none was given")
        result = self.moderator.moderate(
            shown,
            metadata=metadata,
            value_range=value_range,
            apply=False,  # acted on below, in the pipeline's own layout and range
            pixel_values=clip_input if compat else None,
        )
        if len(result.decisions) != count:
            raise ModerationError(f"{len(result.decisions)} decisions for {count} images")
        self.last_unrecorded = list(result.unrecorded)  # the engine has said so in its log
        return result.decisions

    def _act(self, images: Any, indices: list[int], actions: list[str]) -> Any:
        try:
            return act_in_place(images, indices, actions, self.policy)
        except Exception:  # fail closed: black out whatever should not be shown as it is
            logger.exception("applying actions failed; blacking out every flagged image")
            return blackout_in_place(images, indices)


def _reason(decision: Decision) -> str:
    """Why an image was changed, in a few words."""
    if decision.error:
        return decision.error
    if decision.fired:
        return ", ".join(decision.fired[:5]) + (", ..." if len(decision.fired) > 5 else "")
    return "special care" if decision.special_hits else "review band"


def moderate_pipeline(pipe: Any, policy: Any, **options: Any) -> ModeratedPipeline:
    """`pipe` with `policy` (a YAML path, a compiled artifact or a Moderator) judging every image
    or video it returns, used exactly like `pipe`; options: see `ModeratedPipeline.build`."""
    return ModeratedPipeline.build(pipe, policy, **options)
