"""Previews: a step's decoded latents judged with the same policy before an app shows them.

Apps that show intermediate images decode the latents in a `callback_on_step_end`. Such a
preview is an image the user sees, so it is judged like any output: `moderate_preview` takes the
decoded preview ([B, 3, H, W] in [0, 1]) and returns it acted on, with one decision per image,
logged (unless record=False) with metadata `{"preview": true, "step": N, "call_id": ...}`:
the call id is the one the call's final decisions carry, so a preview's decision is linked to
its call. `preview_callback` wraps this as a ready `callback_on_step_end`.

Covered: previews that go through these helpers. Not covered: anything an app shows from the
latents without them (its own decoder, a legacy `callback=`, a progress thumbnail), and the
latents themselves (`output_type="latent"` is refused by the moderated pipeline).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from moderation.decision import Decision, error_decisions
from moderation.engine import Moderator
from moderation.errors import ModerationError

logger = logging.getLogger(__name__)

Show = Callable[[torch.Tensor, list[Decision], int], None]


def moderate_preview(
    moderated: Any, images: torch.Tensor, *, step: int, record: bool = True
) -> tuple[torch.Tensor, list[Decision]]:
    """Judge a decoded preview of the running call of `moderated` (a `moderate_pipeline`
    wrapper); returns the preview as it may be shown and one decision per image. Fails closed:
    if judging fails, every image is blacked out (with an error decision)."""
    moderator: Moderator = moderated.moderator
    metadata = {
        "pipeline": type(moderated.pipeline).__name__,
        **moderated.metadata,
        "preview": True,
        "step": int(step),
        "call_id": moderated.call_id,
    }
    judge = moderator if record else Moderator(moderator.policy, moderator.encoder)
    try:
        result = judge.moderate(images, metadata=metadata, value_range="0,1")
        if len(result.decisions) != images.shape[0]:
            raise ModerationError(f"{len(result.decisions)} decisions for {images.shape[0]}")
        return result.images, result.decisions
    except Exception as exc:  # fail closed: a preview that was not judged is not shown
        logger.exception("moderation failed for a preview of %d images", images.shape[0])
        message = f"{type(exc).__name__}: {exc}"
        metas = [metadata] * images.shape[0]
        return torch.zeros_like(images), error_decisions(moderator.policy, metas, message)


def decode_latents(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] latents of a pipeline with an AutoencoderKL -> [B, 3, H, W] in [0, 1].
    Pipelines that pack their latents (Flux, video pipelines) need their own `decode`."""
    vae = getattr(pipe, "vae", None)
    if vae is None or latents.ndim != 4:
        raise ModerationError(
            f"{type(pipe).__name__}: cannot decode {list(latents.shape)} latents for a preview; "
            "pass decode=(pipe, latents) -> [B, 3, H, W] images in [0, 1]"
        )
    config = vae.config
    shift = getattr(config, "shift_factor", None) or 0.0
    scaled = latents.to(vae.dtype) / config.scaling_factor + shift
    with torch.no_grad():
        decoded = vae.decode(scaled, return_dict=False)[0]
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


def preview_callback(
    moderated: Any,
    show: Show,
    *,
    every: int = 1,
    decode: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    record: bool = True,
) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
    """A `callback_on_step_end` that, every `every` steps, decodes the latents (`decode`,
    default `decode_latents`), judges them (`moderate_preview`) and calls
    `show(images, decisions, step)` with the preview as it may be shown."""
    if every < 1:
        raise ModerationError(f"every must be at least 1, got {every}")

    def callback(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]):
        if step % every == 0:
            try:
                images = (decode or decode_latents)(pipe, callback_kwargs["latents"])
            except Exception:  # nothing decoded: nothing to show, the generation goes on
                logger.exception("moderation: the preview of step %d could not be decoded", step)
                return callback_kwargs
            shown, decisions = moderate_preview(moderated, images, step=step, record=record)
            show(shown, decisions, step)
        return callback_kwargs

    return callback
