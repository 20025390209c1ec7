"""ModeratedPipeline (built by `moderate_pipeline`): a policy behind any diffusers pipeline.

The wrapper is used exactly like the pipeline (same call, `.to()`, offloading, `.components`,
every attribute). Each call runs the pipeline with `output_type="pt"`, so that what is judged
is the decoded tensor on the pipeline's device, before any conversion: images are moderated in
one batch (`Moderator.moderate`), videos frame by frame with one decision per video
(`moderation.integrations.video`); the actions are applied there, and only then is the result
converted to the caller's `output_type` with the pipeline's own processor
(`moderation.integrations.outputs`). The output keeps its class and fields and gains
`nsfw_content_detected` (one bool per image or video) and `decisions`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moderation.actions import apply_actions, policy_settings
from moderation.decision import Decision
from moderation.engine import Moderator
from moderation.errors import ModerationError
from moderation.integrations.outputs import (
    OutputForm,
    caller_output_type,
    check_supported,
    convert,
    form_of,
)
from moderation.integrations.slot import HoldsModerator, caller_block, caller_metadata
from moderation.integrations.video import FRAME_BATCH, act_on_videos, judge_videos
from policy.compiled import CompiledPolicy

logger = logging.getLogger(__name__)

# The wrapper's own attributes; every other attribute is the pipeline's.
_OWN = frozenset(
    {
        "pipeline",
        "moderator",
        "metadata",
        "allow_latent",
        "log_prompt",
        "frame_batch",
        "last_decisions",
        "last_unrecorded",
        "last_timings",
        "call_id",
        "_warned_unlogged",
    }
)


class ModeratedPipeline(HoldsModerator):
    """A diffusers pipeline whose every output is judged by a policy before the caller gets it."""

    unlogged_warning = (
        "moderation: %d outputs need review but this pipeline logs no decisions, so no "
        "reviewer will see them: wrap it with db=URL"
    )

    def __init__(
        self,
        pipeline: Any,
        moderator: Moderator,
        *,
        metadata: Mapping[str, Any] | None = None,
        allow_latent: bool = False,
        log_prompt: bool = True,
        frame_batch: int | None = None,
    ) -> None:
        set_own = object.__setattr__
        set_own(self, "pipeline", pipeline)
        set_own(self, "moderator", moderator)
        set_own(self, "metadata", dict(metadata or {}))
        set_own(self, "allow_latent", allow_latent)
        set_own(self, "log_prompt", log_prompt)
        set_own(self, "frame_batch", frame_batch or FRAME_BATCH)
        set_own(self, "last_decisions", [])
        set_own(self, "last_unrecorded", [])  # ids of last_decisions in neither database nor spool
        # Seconds of the last call: pipeline, moderation, conversion.
        set_own(self, "last_timings", {})
        # The running (or last) call's id, in the metadata of its decisions and its previews'.
        set_own(self, "call_id", None)
        set_own(self, "_warned_unlogged", False)

    @classmethod
    def build(
        cls,
        pipe: Any,
        policy: str | Path | CompiledPolicy | Moderator,
        *,
        metadata: Mapping[str, Any] | None = None,
        allow_latent: bool = False,
        log_prompt: bool = True,
        frame_batch: int | None = None,
        **options: Any,
    ) -> ModeratedPipeline:
        """`pipe` with `policy` judging every image (or video) it returns, used exactly like `pipe`.

        policy: a policy YAML path, a compiled artifact (path or `CompiledPolicy`) or a `Moderator`.
        options: those of `Moderator.from_policy` (`model=`, `db=`, `held_dir=`, `spool_dir=`,
        `device=` (default: the pipeline's device), `dtype=`, `text_model=`, `shadow=`).
        metadata: logged with every decision (plus the call's prompt unless log_prompt=False, and
        `moderated.caller(...)`). allow_latent: let `output_type="latent"` through, unjudged and
        unlogged. frame_batch: video frames encoded at a time (default 16).
        """
        check_supported(pipe)
        if frame_batch is not None and frame_batch < 1:
            raise ModerationError(f"frame_batch must be at least 1, got {frame_batch}")
        if isinstance(policy, Moderator):
            if options:
                raise ModerationError(
                    f"moderate_pipeline: {', '.join(sorted(options))} cannot apply to a Moderator "
                    "that is already built; pass a policy path or artifact instead"
                )
            moderator = policy
        else:
            options.setdefault("device", pipeline_device(pipe))
            moderator = Moderator.from_policy(policy, **options)
        return cls(
            pipe,
            moderator,
            metadata=metadata,
            allow_latent=allow_latent,
            log_prompt=log_prompt,
            frame_batch=frame_batch,
        )

    # -- used like the pipeline -------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "pipeline"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.pipeline, name, value)

    def __repr__(self) -> str:
        return f"moderate_pipeline({type(self.pipeline).__name__}, policy={self.policy.name!r})"

    def to(self, *args: Any, **kwargs: Any) -> ModeratedPipeline:
        """`pipe.to(...)`, and the policy's encoder follows a device move."""
        self.pipeline.to(*args, **kwargs)
        device = next((a for a in args if isinstance(a, (str, torch.device))), kwargs.get("device"))
        if device is not None:
            _move_encoder(self.moderator, torch.device(device))
        return self

    @property
    def policy(self) -> CompiledPolicy:
        return self.moderator.policy

    # -- caller metadata --------------------------------------------------------------------

    def caller(self, **metadata: Any) -> contextlib.AbstractContextManager[ModeratedPipeline]:
        """Metadata (prompt, seed, user, ...) logged with every image or video made inside the
        block: `with moderated.caller(user=u, seed=s): moderated(prompt)`."""
        return caller_block(self, metadata)

    def _metadata(self, args: tuple, kwargs: dict[str, Any], count: int) -> list[dict[str, Any]]:
        """Per image: wrapper metadata, the call's prompt (by default), then caller()."""
        base = {"pipeline": type(self.pipeline).__name__, "call_id": self.call_id, **self.metadata}
        extra = caller_metadata(self)
        prompts: list[Any] = [None] * count
        if self.log_prompt:
            prompts = _prompts(self.pipeline, args, kwargs, count)
        return [{**base, **({"prompt": p} if p is not None else {}), **extra} for p in prompts]

    # -- a call -----------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        output_type = caller_output_type(self.pipeline, kwargs)
        return_dict = kwargs.pop("return_dict", True)
        if output_type == "latent":
            return self._latent(args, kwargs, return_dict)
        self.call_id = uuid.uuid4().hex  # links this call's previews (previews.py) to its outputs
        started = time.perf_counter()
        output = self.pipeline(*args, **{**kwargs, "output_type": "pt", "return_dict": True})
        generated = time.perf_counter()
        form = form_of(self.pipeline, output)  # raises before anything is returned
        decoded = getattr(output, form.field)
        count = decoded.shape[0]
        decisions, moderated = self._moderate(decoded, form, args, kwargs, count)
        judged = time.perf_counter()
        setattr(output, form.field, convert(self.pipeline, form, moderated, output_type))
        self.last_timings = {
            "pipeline": generated - started,
            "moderation": judged - generated,
            "conversion": time.perf_counter() - judged,
        }
        ours = [d.action != "allow" or d.verdict == "error" for d in decisions]
        theirs = getattr(output, "nsfw_content_detected", None)  # diffusers' own checker
        if isinstance(theirs, list) and len(theirs) == count:
            ours = [bool(a) or bool(b) for a, b in zip(ours, theirs, strict=True)]
        output.nsfw_content_detected = ours
        output.decisions = decisions
        return output if return_dict else output.to_tuple()

    def _latent(self, args: tuple, kwargs: dict[str, Any], return_dict: bool) -> Any:
        if not self.allow_latent:
            raise ModerationError(
                'output_type="latent" returns latents, which cannot be judged: moderate the '
                "decoded output instead, or wrap with allow_latent=True to let latents through "
                "unjudged"
            )
        logger.warning(
            "moderation: output_type='latent' with allow_latent=True: nothing in this call was "
            "judged or logged"
        )
        self.last_decisions, self.last_unrecorded = [], []
        return self.pipeline(*args, **{**kwargs, "return_dict": return_dict})

    def _moderate(
        self, decoded: torch.Tensor, form: OutputForm, args: tuple, kwargs: dict, count: int
    ) -> tuple[list[Decision], torch.Tensor]:
        """Decisions and the acted tensor (same layout, range and device); fails closed."""
        self.last_unrecorded = []
        metas: Any = None
        try:
            metas = self._metadata(args, kwargs, count)
            if form.video:
                result = judge_videos(self.moderator, decoded, metas, frame_batch=self.frame_batch)
            else:
                result = self.moderator.moderate(
                    decoded, metadata=metas, value_range=form.value_range, apply=False
                )
            decisions = result.decisions
            if len(decisions) != count:
                raise ModerationError(f"{len(decisions)} decisions for {count} outputs")
            self.last_unrecorded = list(result.unrecorded)
        except Exception as exc:  # fail closed: whatever went wrong, nothing goes out unjudged
            logger.exception("moderation failed for a call of %d outputs", count)
            decisions = self._fail(count, f"{type(exc).__name__}: {exc}", metas)
        self.last_decisions = decisions
        # An error decision is never shown as it is, whatever its action says.
        actions = [
            "blackout" if d.verdict == "error" and d.action == "allow" else d.action
            for d in decisions
        ]
        self._warn_if_unreviewed(decisions)
        return decisions, self._act(decoded, form, actions)

    def _act(self, decoded: torch.Tensor, form: OutputForm, actions: list[str]) -> torch.Tensor:
        """The actions applied in the decoded tensor's own range; allowed outputs untouched."""
        if all(a == "allow" for a in actions):
            return decoded
        signed = form.value_range == "-1,1"
        unit = (decoded.float() * 0.5 + 0.5).clamp(0, 1) if signed else decoded.float()
        try:
            if form.video:
                acted = act_on_videos(unit, actions, self.policy)
            else:
                acted = apply_actions(unit, actions, **policy_settings(self.policy))
        except Exception:  # fail closed: black out whatever should not be shown as it is
            logger.exception("applying actions failed; blacking out every flagged output")
            keep = torch.tensor([a == "allow" for a in actions], device=unit.device)
            shape = (-1,) + (1,) * (unit.ndim - 1)
            acted = torch.where(keep.view(shape), unit, torch.zeros_like(unit))
        out = acted * 2 - 1 if signed else acted
        return out.to(decoded.dtype)


def _prompts(pipe: Any, args: tuple, kwargs: dict[str, Any], count: int) -> list[Any]:
    """Each output's prompt, from the call's `prompt` argument: one string for all, or a list
    of P prompts whose outputs come prompt by prompt (count / P each); None without one."""
    try:
        bound = inspect.signature(type(pipe).__call__).bind_partial(pipe, *args, **kwargs)
        prompt = bound.arguments.get("prompt")
    except TypeError:
        prompt = kwargs.get("prompt")
    if isinstance(prompt, str):
        return [prompt] * count
    if isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt):
        if count % len(prompt) == 0:
            return [prompt[i // (count // len(prompt))] for i in range(count)]
        return [list(prompt)] * count
    return [None] * count


def pipeline_device(pipe: Any) -> torch.device:
    """Where the pipeline decodes: its execution device (offloading), else its device."""
    for name in ("_execution_device", "device"):
        try:
            device = getattr(pipe, name)
        except Exception:
            continue
        if isinstance(device, torch.device):
            return device
    return torch.device("cpu")


def _move_encoder(moderator: Moderator, device: torch.device) -> None:
    """Move the Moderator's encoder (its towers) and its policy to `device`."""
    encoder = moderator.encoder
    if encoder is None or getattr(encoder, "device", device) == device:
        return
    for name in ("vision_model", "visual_projection", "module"):
        module = getattr(encoder, name, None)
        if isinstance(module, torch.nn.Module):
            module.to(device)
    if "device" in vars(encoder):
        encoder.device = device
    moderator.to(device)
