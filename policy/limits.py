"""The numbers a policy must stay within, and the one check of each, shared by the YAML schema,
`CompiledPolicy` (compiled in code or loaded from an artifact) and the image actions.

Each `*_problem` function returns why a value is unusable, or None when it is fine.
"""

from __future__ import annotations

import math
import re

# diffusers' safety checker adds this Python float once a special-care concept fires; a policy
# with `compat: diffusers` must say the same (scoring uses this constant for its bit-exact path).
DIFFUSERS_ADJUSTMENT = 0.01
# Sizes of the database columns that names end up in (moderation/storage/models.py).
NAME_MAX = 200  # policy, concept and category names
VERSION_MAX = 64
MODEL_MAX = 500
# Blur and pixelate strengths are fractions of the image's shorter side, so that an action hides
# the same at 512x512 and at 4096x4096. Below the minimums the output is nearly the input: a
# Gaussian of sigma 1% of the side leaves features of a few percent of the image legible, and a
# b-wide pixelate block low-passes like a Gaussian of sigma b/sqrt(12), so 2% is about as weak.
BLUR_RADIUS_MIN, BLUR_RADIUS_DEFAULT = 0.01, 0.05  # the old default, 24 px at 512 px, was 0.047
PIXELATE_BLOCK_MIN, PIXELATE_BLOCK_DEFAULT = 0.02, 0.03  # the old 16 px at 512 px was 0.031
STRENGTH_MAX = 1.0
REFERENCE_SIDE = 512  # Stable Diffusion's output size, to convert old pixel values in messages
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: never in a stored name


def name_problem(value: str, limit: int) -> str | None:
    """Why a name cannot be stored and shown as it is."""
    if len(value) > limit:
        return f"must be at most {limit} characters (the database column's size), got {len(value)}"
    bad = _CONTROL.search(value)
    if bad is not None:
        return f"must not contain control characters (U+{ord(bad.group()):04X})"
    return None


def strength_problem(value: float, minimum: float, what: str) -> str | None:
    """Why a blur radius or pixelate block (a fraction of the shorter side) is unusable."""
    if not math.isfinite(value):
        return "must be a finite number"
    if value > STRENGTH_MAX:
        return (
            f"must be a fraction of the image's shorter side (at most {STRENGTH_MAX:g}), not"
            f" pixels: {value:g} px at {REFERENCE_SIDE} px is {value / REFERENCE_SIDE:.3g}"
        )
    if value < minimum:
        return (
            f"must be at least {minimum:g} of the image's shorter side: a weaker {what} leaves"
            " the image almost as it was"
        )
    return None


def blur_problem(value: float) -> str | None:
    return strength_problem(value, BLUR_RADIUS_MIN, "blur")


def pixelate_problem(value: float) -> str | None:
    return strength_problem(value, PIXELATE_BLOCK_MIN, "pixelation")


def adjustment_problem(value: float) -> str | None:
    """Why a special-care adjustment is unusable."""
    if value < 0:
        return (
            "must not be negative: a negative adjustment would loosen every threshold once"
            " special care fires"
        )
    if not value <= 1:  # NaN too
        return "must be between 0 and 1"
    return None
