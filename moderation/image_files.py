"""Image files: decoding with a memory budget, by bit depth, and every judged frame of an animation.

- Size: a file over `max_pixels` (default PIL's own bomb limit) is refused before it is decoded;
  one over `decode_pixels` (default 16 MP) is reduced by an integer factor while it is decoded
  (JPEG's DCT scaling through `Image.draft`, else `Image.reduce`), so a 12000 x 12000 PNG costs
  its 8-bit decode and not 7.5 GB. The reduced image is what is judged, acted on and written.
- Bit depth: 16-bit greys (`I;16`, `I;16B`, ...) are scaled by 65535; 32-bit integer greys (`I`)
  by 65535 when their values fit 16 bits, else by their own range; float images (`F`) are read
  as [0,1] (clamped) when their values lie within RANGE_SLACK of it, so overshoot cannot
  rescale the other pixels, else by their own range. NaN/inf is an error.
- Animations (GIF, APNG, WebP): up to `max_frames` frames (default 32) every frame is judged;
  beyond, `max_frames` of them: the first, the last, and the frame on screen at evenly spaced
  instants of the animation's display time, topped up with frames evenly spaced by number. On
  top of those, every frame shown for LONG_FRAME_MS or more is judged, up to 4 x `max_frames` in
  all (more is an error: the animation is not judged). So every frame shown for 1 s, or for
  1/30 of the loop, is judged; a shorter flash among more than `max_frames` frames may not be.
- Per-file decode budget (frame bombs): a GIF, APNG or WebP frame is composited at the size of
  the whole canvas, so a huge canvas with many tiny frames costs canvas x frames. Before any
  pixel is decoded, the pixels the file would decode (canvas x frames up to the last judged one;
  each judged page of a TIFF) are counted against `max_decoded_pixels` (FILE_PIXELS, or
  $MODERATION_MAX_DECODED_PIXELS), and decoding stops after `max_seconds` (FILE_SECONDS, or
  $MODERATION_MAX_DECODE_SECONDS). Frame durations are read from the container (frame_timing),
  so every frame is decoded once. A file over either budget is an ImageInputError: an `error`
  decision with the policy's `on_error` action, never hours of CPU.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence, UnidentifiedImageError

from moderation.errors import ModerationError
from moderation.frame_timing import durations_ms
from moderation.value_range import RANGE_SLACK

# PIL raises DecompressionBombError above twice its MAX_IMAGE_PIXELS: refuse from there on.
MAX_PIXELS = 2 * 89_478_485
DECODE_PIXELS = 1 << 24  # 16,777,216 = 4096 x 4096: larger files are reduced while decoded
MAX_FRAMES = 32  # frames judged of an animation with more (see the module docstring)
LONG_FRAME_MS = 1000  # a frame shown this long is always judged, up to 4 x max_frames in all
MAX_FILE_FRAMES = 10_000  # frames decoded at most (an animation with more is refused)
FRAME_PIXELS = 1 << 26  # judged frames x their pixels: frames are reduced to fit (64 MP)
# Browsers show GIF frames of 0-10 ms for 100 ms; so does the sampling's clock.
MIN_FRAME_MS, SHORT_FRAME_MS = 10, 100
# Knobs: the per-file decode budget (see the module docstring). 4 x PIL's bomb limit is four
# full-size frames, or 300 frames of 1920x1080; 30 s is far above what such a file takes.
FILE_PIXELS = 4 * MAX_PIXELS
FILE_SECONDS = 30.0
FILE_PIXELS_ENV = "MODERATION_MAX_DECODED_PIXELS"
FILE_SECONDS_ENV = "MODERATION_MAX_DECODE_SECONDS"
# Frames of these formats are composited onto the canvas: each one decoded costs the canvas.
COMPOSITED = frozenset({"GIF", "PNG", "WEBP"})


class ImageInputError(ModerationError):
    """An input image cannot be read, or has the wrong type, shape or dtype."""


@dataclass(frozen=True, eq=False)
class ImageFile:
    """A decoded image file (or PIL image): the frames that are judged, as uint8 RGB."""

    frames: torch.Tensor  # [F,3,H,W] uint8 on the CPU; F = 1 for a still image
    frame_numbers: tuple[int, ...]  # each judged frame's number in the file
    durations_ms: tuple[int, ...]  # how long each judged frame stays on screen when re-animated
    frame_count: int  # frames in the file
    path: str | None = None
    reduced: int = 1  # the integer factor the image was reduced by while decoded

    @property
    def animated(self) -> bool:
        return self.frame_count > 1

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the decoded frames."""
        return tuple(self.frames.shape[-2:])


class _Budget:
    """A file's decode budget: pixels planned before decoding, and a deadline."""

    def __init__(self, name: str, pixels: int, seconds: float) -> None:
        self.name, self.pixels, self.seconds = name, pixels, seconds
        self.deadline = time.monotonic() + seconds

    def plan(self, cost: int, what: str) -> None:
        if cost > self.pixels:
            raise ImageInputError(
                f"{self.name}: {what} would decode {cost:,} pixels, more than the "
                f"{self.pixels:,} allowed per file (max_decoded_pixels, {FILE_PIXELS_ENV})"
            )

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise ImageInputError(
                f"{self.name}: decoding took more than the {self.seconds:g} s allowed per file "
                f"(max_seconds, {FILE_SECONDS_ENV})"
            )


def _knob(given: float | None, env: str, default: float, kind: type) -> float:
    if given is not None:
        return given
    text = os.environ.get(env)
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ModerationError(f"{env}={text!r}: not a positive number")
    return value


def read_image(
    source: str | Path | Image.Image,
    *,
    max_pixels: int | None = None,
    decode_pixels: int | None = None,
    max_frames: int | None = None,
    max_decoded_pixels: int | None = None,
    max_seconds: float | None = None,
) -> ImageFile:
    """Decode a file (or a PIL image) within a memory and time budget; errors name the file.

    Defaults: MAX_PIXELS, DECODE_PIXELS, MAX_FRAMES, and the per-file budget FILE_PIXELS and
    FILE_SECONDS (or $MODERATION_MAX_DECODED_PIXELS and $MODERATION_MAX_DECODE_SECONDS). A PIL
    image already in memory is not reduced (`decode_pixels` applies to files), but the frames
    of an animated one are sampled and bounded like a file's.
    """
    name = "image" if isinstance(source, Image.Image) else str(source)
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    decode_pixels = DECODE_PIXELS if decode_pixels is None else decode_pixels
    max_frames = MAX_FRAMES if max_frames is None else max_frames
    budget = _Budget(
        name,
        int(_knob(max_decoded_pixels, FILE_PIXELS_ENV, FILE_PIXELS, int)),
        float(_knob(max_seconds, FILE_SECONDS_ENV, FILE_SECONDS, float)),
    )
    try:
        with warnings.catch_warnings():
            # Our own max_pixels decides; PIL's warning below its error limit is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(source, Image.Image):
                return _decode(source, name, None, max_pixels, None, max_frames, budget)
            with Image.open(source) as image:
                return _decode(
                    image, name, str(source), max_pixels, decode_pixels, max_frames, budget
                )
    except ImageInputError:
        raise
    except FileNotFoundError:
        raise ImageInputError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageInputError(f"{name}: is a directory") from None
    except PermissionError:
        raise ImageInputError(f"{name}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageInputError(f"{name}: cannot identify image file") from None
    except Image.DecompressionBombError as exc:
        raise ImageInputError(f"{name}: image too large ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageInputError(f"{name}: cannot read image ({exc})") from None


def _decode(
    image: Image.Image,
    name: str,
    path: str | None,
    max_pixels: int,
    decode_pixels: int | None,
    max_frames: int,
    budget: _Budget,
) -> ImageFile:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageInputError(
            f"{name}: {width}x{height} is {width * height:,} pixels, more than the "
            f"{max_pixels:,} allowed (max_pixels)"
        )
    count = _frame_count(image, name)
    orientation = _orientation(image)
    if count == 1:
        budget.plan(width * height, f"{width}x{height}")
        factor = 1 if decode_pixels is None else _factor(width * height, decode_pixels)
        if factor > 1 and image.format == "JPEG":
            # DCT scaling: the full-size image is never in memory.
            image.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
        image.load()
        frame = _to_array(_reduce(_to_rgb(image, name), (width, height), factor), orientation)
        return ImageFile(_stack([frame]), (0,), (0,), 1, path, factor)
    durations, sizes = _frame_table(image, count, path, budget, max_pixels)
    count = len(durations)
    chosen = sample_frames(durations, max_frames)
    if len(chosen) > 4 * max_frames:
        raise ImageInputError(
            f"{name}: {len(chosen)} of its {count} frames must be judged (a frame shown for "
            f"{LONG_FRAME_MS} ms or more is never skipped), more than the {4 * max_frames} allowed"
        )
    if sizes is None:  # composited: every frame up to the last judged one, at canvas size
        budget.plan(
            (chosen[-1] + 1) * width * height, f"{chosen[-1] + 1} frames of {width}x{height}"
        )
    else:  # pages: only the judged ones are decoded
        budget.plan(sum(sizes[n] for n in chosen), f"{len(chosen)} pages")
    per_frame = FRAME_PIXELS // len(chosen)
    factor = _factor(width * height, min(per_frame, decode_pixels or per_frame))
    wanted, frames = set(chosen), []
    for number, frame in enumerate(ImageSequence.Iterator(image)):
        budget.check_time()  # between frames: a single frame is bounded by the pixel budget
        if number in wanted:
            rgb = _reduce(_to_rgb(frame, name), (width, height), factor)
            frames.append(_to_array(rgb, orientation))
        if number >= chosen[-1]:
            break
    if len(frames) != len(chosen):  # the file ended early the second time it was read
        raise ImageInputError(f"{name}: cannot read image (frames missing)")
    # Re-animated, each judged frame stays until the next judged one: the loop keeps its length.
    shown = [_shown_ms(d) for d in durations]
    kept = [sum(shown[a:b]) for a, b in zip(chosen, [*chosen[1:], count], strict=True)]
    return ImageFile(_stack(frames), tuple(chosen), tuple(kept), count, path, factor)


def sample_frames(durations_ms: list[int], max_frames: int | None = None) -> list[int]:
    """Numbers of the frames judged of an animation whose frames last `durations_ms` (sorted).

    Every frame when there are at most `max_frames`; else the first, the last, the frames on
    screen at max_frames - 2 evenly spaced instants, frames evenly spaced by number until there
    are max_frames, and every frame shown for LONG_FRAME_MS or more.
    """
    max_frames = MAX_FRAMES if max_frames is None else max_frames
    count = len(durations_ms)
    if count <= max_frames:
        return list(range(count))
    shown = [_shown_ms(d) for d in durations_ms]
    starts = np.cumsum([0, *shown[:-1]])  # when each frame appears
    total = starts[-1] + shown[-1]
    instants = (np.arange(max_frames - 2) + 0.5) * total / max(max_frames - 2, 1)
    chosen = {0, count - 1, *np.searchsorted(starts, instants, side="right") - 1}
    for n in np.linspace(0, count - 1, max_frames).round().astype(int):
        if len(chosen) >= max_frames:
            break
        chosen.add(int(n))
    chosen |= {n for n, d in enumerate(shown) if d >= LONG_FRAME_MS}
    return sorted(int(n) for n in chosen)


def _shown_ms(duration: float) -> int:
    return SHORT_FRAME_MS if duration <= MIN_FRAME_MS else int(duration)


def _frame_count(image: Image.Image, name: str) -> int:
    count = int(getattr(image, "n_frames", 1) or 1) if getattr(image, "is_animated", False) else 1
    if count > MAX_FILE_FRAMES:
        raise ImageInputError(
            f"{name}: {count:,} frames, more than the {MAX_FILE_FRAMES:,} allowed in an animation"
        )
    return count


def _frame_table(
    image: Image.Image, count: int, path: str | None, budget: _Budget, max_pixels: int
) -> tuple[list[int], list[int] | None]:
    """Each frame's display time in ms, and each page's pixels (None: composited frames, each
    the canvas), without decoding a frame where the container allows (frame_timing)."""
    width, height = image.size
    if image.format not in COMPOSITED:
        # TIFF pages and the like: seeking reads a page's header, not its pixels.
        durations, sizes = [], []
        for number in range(count):
            budget.check_time()
            image.seek(number)
            w, h = image.size
            if w * h > max_pixels:
                raise ImageInputError(
                    f"{budget.name}: frame {number} is {w}x{h}, {w * h:,} pixels, more than the "
                    f"{max_pixels:,} allowed (max_pixels)"
                )
            durations.append(int(image.info.get("duration") or 0))
            sizes.append(w * h)
        image.seek(0)
        return durations, sizes
    parsed = durations_ms(path, image.format) if path is not None else None
    if parsed is not None and len(parsed) == count:
        return parsed, None
    # Pillow must decode them to say (twice in all: this pass, then the judged frames).
    budget.plan(2 * count * width * height, f"{count} frames of {width}x{height} read twice")
    durations = []
    for frame in ImageSequence.Iterator(image):
        budget.check_time()
        frame.load()  # WebP sets the duration when the frame is decoded
        durations.append(int(frame.info.get("duration") or 0))
        if len(durations) >= count:
            break
    image.seek(0)
    return durations, None


def _factor(pixels: int, budget: int) -> int:
    """Smallest integer factor that brings `pixels` within `budget`."""
    return max(1, math.ceil(math.sqrt(pixels / max(budget, 1))))


def _reduce(image: Image.Image, full: tuple[int, int], factor: int) -> Image.Image:
    """Reduce to about full / factor (a JPEG draft may have done part of it already)."""
    if factor <= 1:
        return image
    target = (max(1, full[0] // factor), max(1, full[1] // factor))
    step = max(1, min(image.size[0] // target[0], image.size[1] // target[1]))
    return image.reduce(step) if step > 1 else image


_TRANSPOSE = {  # EXIF orientation -> the transpose that shows the image upright (as ImageOps)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except (ValueError, TypeError, OSError, SyntaxError):
        return 1  # a broken EXIF block must not make the picture unreadable


def _to_array(image: Image.Image, orientation: int) -> np.ndarray:
    """[H,W,3] uint8 of an RGB image, turned as its EXIF orientation says viewers show it."""
    method = _TRANSPOSE.get(orientation)
    if method is not None:
        image = image.transpose(method)
    return np.asarray(image, dtype=np.uint8)


def _stack(frames: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.stack(frames))).permute(0, 3, 1, 2)


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """8-bit RGB, converting by bit depth (see the module doc) and compositing alpha on white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_gray_to_uint8(np.asarray(image), image.mode, name)).convert("RGB")
    return pil_to_rgb(image)


def _gray_to_uint8(values: np.ndarray, mode: str, name: str) -> np.ndarray:
    if mode.startswith("I;16"):
        return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if mode == "F" and not np.isfinite(values).all():
        raise ImageInputError(f"{name}: the image holds NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if mode == "I" and low >= 0 and high <= 65535:
        low, high = 0.0, 65535.0
    elif mode == "F" and low >= -RANGE_SLACK and high <= 1 + RANGE_SLACK:
        # [0,1] with overshoot, clamped: one pixel a little beyond must not rescale the others
        low, high = 0.0, 1.0
    span = high - low or 1.0
    unit = (values.astype(np.float32) - np.float32(low)) / np.float32(span)
    return np.clip(np.round(unit * 255), 0, 255).astype(np.uint8)


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """RGB like transformers' do_convert_rgb: transparency is composited onto white."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def save_result(target: str | Path, image: Image.Image, source: ImageFile, allowed: bool) -> Path:
    """Write a moderated file as PNG. An allowed animation becomes an animated PNG of its judged
    frames only (each shown until the next judged one, so the loop keeps its length); anything
    else is a still PNG of `image`, the acted result: frames never judged are never re-animated."""
    from policy.atomic import atomic_file

    target = Path(target)
    if not (allowed and len(source.frame_numbers) > 1):
        with atomic_file(target) as file:
            image.save(file, format="PNG")
        return target
    frames = [Image.fromarray(f) for f in source.frames.permute(0, 2, 3, 1).numpy()]
    durations = [max(d, 1) for d in source.durations_ms]
    with atomic_file(target) as file:
        frames[0].save(
            file, format="PNG", save_all=True, append_images=frames[1:], duration=durations, loop=0
        )
    return target
