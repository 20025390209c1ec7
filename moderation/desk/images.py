"""Image renditions the desk serves: the held original, checked, and its blurred greyscale
stand-in that a reviewer sees until they choose to reveal the image."""

from __future__ import annotations

import io

from PIL import Image, ImageFilter

from moderation.storage.held import HeldStore

BLURRED_SIZE = 256  # knob: longest side of the blurred rendition, in pixels
BLUR_FRACTION = 0.06  # knob: blur radius as a fraction of that side (shapes stay, details go)


def held_original(held: HeldStore, held_path: str) -> bytes:
    """The held file's bytes after checking them against the sha256 in its name
    (StorageError when missing or corrupt)."""
    return held.get(held_path)


def blurred(data: bytes) -> bytes:
    """A small, greyscale, heavily blurred PNG of an image."""
    with Image.open(io.BytesIO(data)) as image:
        image.seek(0)  # the first frame of an animation
        grey = image.convert("L")
    grey.thumbnail((BLURRED_SIZE, BLURRED_SIZE))
    radius = max(4.0, BLUR_FRACTION * max(grey.size))
    out = io.BytesIO()
    grey.filter(ImageFilter.GaussianBlur(radius)).save(out, format="PNG")
    return out.getvalue()
