"""Moderation engine for generated images: apply declarative policies, log and review decisions."""

from typing import TYPE_CHECKING, Any

from moderation.errors import ModerationError
from moderation.quiet import silence_torchvision_fallback

silence_torchvision_fallback()  # a notice about an optional backend the engine does not use

if TYPE_CHECKING:
    from moderation.decision import Decision
    from moderation.engine import ModerationResult, Moderator

__all__ = ["Decision", "ModerationError", "ModerationResult", "Moderator"]


def __getattr__(name: str) -> Any:
    # torch and transformers load only when the engine is used, so the CLI starts fast.
    if name in ("Moderator", "ModerationResult"):
        from moderation import engine

        return getattr(engine, name)
    if name == "Decision":
        from moderation.decision import Decision

        return Decision
    raise AttributeError(f"module 'moderation' has no attribute {name!r}")
