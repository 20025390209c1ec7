"""The engine's closed vocabularies, written once: every layer that reads, checks or acts on
these names imports them from here (the schema, the compiled-policy rules, the actions, the
decision log, review and the CLI).

Order matters where it is said to: ACTIONS is in increasing severity, and ACTION_RANK is that
order as numbers (the decision rule takes the highest rank).
"""

from __future__ import annotations

from typing import Literal

# What a policy may do to an image, in increasing severity.
ACTIONS: tuple[str, ...] = ("allow", "review", "blur", "pixelate", "blackout")
ACTION_RANK: dict[str, int] = {action: rank for rank, action in enumerate(ACTIONS)}
# Actions that change the pixels the caller gets back.
PIXEL_ACTIONS: tuple[str, ...] = ("blur", "pixelate", "blackout")
# What `on_error` may be: an image the engine could not judge is never passed as clean.
FAIL_CLOSED: tuple[str, ...] = tuple(a for a in ACTIONS if a != "allow")
# What an image held for review shows meanwhile: it hides something, so never `allow` (the
# original would go out before a human saw it) nor `review` (that is not a picture).
PLACEHOLDERS: tuple[str, ...] = PIXEL_ACTIONS
# A decision's verdict: `flag` for every pixel action.
VERDICTS: tuple[str, ...] = ("allow", "flag", "review", "error")
# The square views an image is judged on (moderation.preprocess): every pixel, CLIP's centre
# crop, or every pixel plus tiles for small content.
VIEWS: tuple[str, ...] = ("cover", "center", "tiles")
# A review item's life, and the statuses in which a human has decided.
REVIEW_STATUSES: tuple[str, ...] = ("pending", "claimed", "approved", "rejected")
DECIDED: tuple[str, ...] = ("approved", "rejected")

# The same names as types, for pydantic models (a Literal over a tuple is a Literal of its items).
Action = Literal[ACTIONS]  # type: ignore[valid-type]
Placeholder = Literal[PLACEHOLDERS]  # type: ignore[valid-type]
View = Literal[VIEWS]  # type: ignore[valid-type]


def verdict_of(action: str) -> str:
    """The verdict of a judged image whose action is `action`."""
    if action not in ACTION_RANK:
        raise ValueError(f"unknown action {action!r} (expected one of {', '.join(ACTIONS)})")
    return action if action in ("allow", "review") else "flag"
