"""What the diffusers integrations share: caller metadata blocks, a checker class that
`from_pipe` carries over, the device of a diffusers device_map, and what both wrappers do with
their Moderator (warn once when nothing is logged, release, close)."""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from moderation.decision import Decision
    from moderation.engine import Moderator

# Caller metadata of the `with x.caller(...)` blocks around this context: {id(x): {...}}.
_CALLER: contextvars.ContextVar[dict[int, dict[str, Any]] | None] = contextvars.ContextVar(
    "moderation_caller", default=None
)


@contextlib.contextmanager
def caller_block(owner: Any, metadata: dict[str, Any]) -> Iterator[Any]:
    """`metadata` logged with every image `owner` moderates inside the block (nested blocks
    add to the outer ones)."""
    outer = _CALLER.get() or {}
    token = _CALLER.set({**outer, id(owner): {**outer.get(id(owner), {}), **metadata}})
    try:
        yield owner
    finally:
        _CALLER.reset(token)


def caller_metadata(owner: Any) -> dict[str, Any]:
    """The metadata of the `caller_block`s of `owner` around this call."""
    return (_CALLER.get() or {}).get(id(owner), {})


class SlotClass(type):
    """Lets `Pipeline.from_pipe(pipe)` carry our checker over to the new pipeline.

    diffusers' `from_pipe` keeps a model component only when `type(component) in` the new
    pipeline's type hint for its slot (`(StableDiffusionSafetyChecker,)`), and otherwise drops it,
    so that the new pipeline fails with "missing 1 required positional argument:
    'safety_checker'". A checker class compares equal to the classes it stands in for
    (`stands_in_for`: module and name); identity, hashing and `isinstance` are unchanged."""

    def __eq__(cls, other: object) -> bool:
        if cls is other:
            return True
        if not isinstance(other, type):
            return NotImplemented
        return any(
            other.__module__ == module and other.__name__ == name
            for module, name in cls.__dict__.get("stands_in_for", ())
        )

    __hash__ = type.__hash__


def device_of_map(device_map: Any) -> torch.device | str | None:
    """The one device of a diffusers device_map ("cuda", {"": "cuda:0"}), None when it has none."""
    if isinstance(device_map, Mapping):
        devices = set(device_map.values())
        return devices.pop() if len(devices) == 1 else None
    return device_map if isinstance(device_map, (str, torch.device, int)) else None


class HoldsModerator:
    """What PolicySafetyChecker and ModeratedPipeline do alike with their `moderator`: error
    decisions when judging failed, a warning once when images need review but no decision is
    logged, release of a held original, close."""

    moderator: Moderator
    last_unrecorded: list[str]
    _warned_unlogged: bool
    # The warning (logged by the class's own module), with %d for the number waiting.
    unlogged_warning: str

    def _warn_if_unreviewed(self, decisions: list[Decision]) -> None:
        waiting = sum(d.needs_review for d in decisions)
        if waiting and self.moderator.log is None and not self._warned_unlogged:
            self._warned_unlogged = True
            logging.getLogger(type(self).__module__).warning(self.unlogged_warning, waiting)

    def _fail(self, count: int, message: str, metadata: Any) -> list[Decision]:
        """Error decisions (the policy's on_error) for the whole batch, recorded like any other;
        when they cannot be recorded, said in the log and in `last_unrecorded`."""
        from moderation.decision import error_decisions

        logger = logging.getLogger(type(self).__module__)
        # The caller's metadata may be what failed (wrong length, not storable): then without it.
        for attempt in (metadata, None):
            try:
                return self.moderator.fail([message] * count, metadata=attempt)
            except Exception:
                logger.exception("moderation: recording %d error decisions failed", count)
        decisions = error_decisions(self.moderator.policy, [{} for _ in range(count)], message)
        self.last_unrecorded = [d.decision_id for d in decisions]
        logger.error(
            "moderation: %d error decisions were NOT recorded: %s",
            count,
            ", ".join(d.decision_id for d in decisions),
        )
        return decisions

    # -- review ------------------------------------------------------------------------------

    def release(self, decision_id: str) -> bytes:
        """The held original (PNG bytes) of a reviewed decision, once a reviewer approved it."""
        from moderation.review.release import release_from_log

        return release_from_log(self.moderator.log, decision_id)

    def close(self) -> None:
        """Flush and close the decision log."""
        self.moderator.close()
