"""Image renditions the desk serves: the held original, checked, and its blurred greyscale
stand-in that a reviewer sees until they choose to reveal the image."""

from __future__ import annotations

import io

from PIL import Image, ImageFilter

from moderation.storage.held import HeldStore

# How a reviewer sees an image until they reveal it (their preference; blurred either way).
IMAGE_MODES = {"blur-grey": "blurred and in greyscale", "blur": "blurred, in colour"}
DEFAULT_MODE = "blur-grey"
BLURRED_SIZE = 256  # knob: longest side of the blurred rendition, in pixels
BLUR_FRACTION = 0.06  # knob: blur radius as a fraction of that side (shapes stay, details go)


def held_original(held: HeldStore, held_path: str) -> bytes:
    """The held file's bytes after checking them against the sha256 in its name
    (StorageError when missing or corrupt)."""
    return held.get(held_path)


def image_mode_or_default(mode: object) -> str:
    """A known image mode, else the default (a stored preference never unblurs anything)."""
    return mode if isinstance(mode, str) and mode in IMAGE_MODES else DEFAULT_MODE


def blurred(data: bytes, mode: str = DEFAULT_MODE) -> bytes:
    """A small, heavily blurred PNG of an image: greyscale (`blur-grey`) or in colour (`blur`)."""
    with Image.open(io.BytesIO(data)) as image:
        image.seek(0)  # the first frame of an animation
        small = image.convert("RGB" if mode == "blur" else "L")
    small.thumbnail((BLURRED_SIZE, BLURRED_SIZE))
    radius = max(4.0, BLUR_FRACTION * max(small.size))
    out = io.BytesIO()
    small.filter(ImageFilter.GaussianBlur(radius)).save(out, format="PNG")
    return out.getvalue()
