"""The review placeholder, marked as such in files a person opens (`check --out`).

A `review` decision shows its policy's placeholder (a blur by default) until a reviewer decides:
without a mark, that placeholder looks exactly like a final blur. The written file gets a badge
across its top ("PENDING REVIEW") and a name that says it (`a.png` -> `a.pending-review.png`).
The images the engine returns to callers are left as the policy makes them.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

BADGE = "PENDING REVIEW: placeholder, not a final decision"
SUFFIX = ".pending-review"


def pending_review_name(name: Path) -> Path:
    """`a.png` -> `a.pending-review.png` (the name a review placeholder is written under)."""
    return name.with_name(f"{name.stem}{SUFFIX}{name.suffix}")


def with_badge(image: Image.Image) -> Image.Image:
    """A copy of `image` with a yellow band and BADGE across its top."""
    out = image.convert("RGB")
    width, height = out.size
    band = max(12, min(height // 8, width // 16))
    try:
        font = ImageFont.load_default(size=max(8, band * 2 // 3))
    except TypeError:  # Pillow without FreeType sizes: the fixed bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, 0, width, band), fill=(255, 214, 0))
    text = BADGE
    while text and draw.textlength(text, font=font) > width - 4:
        text = text[: text.rfind(" ")] if " " in text else ""  # cut at a word to fit
    draw.text((2, band // 6), text or "REVIEW", fill=(0, 0, 0), font=font)
    return out
