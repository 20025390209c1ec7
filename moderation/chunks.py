"""Splitting one moderate() call into chunks of bounded memory, and joining the results.

A batch of sixteen 12000 x 12000 images must not cost sixteen times the float32 copies of one:
the engine converts, judges and acts on one chunk at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from moderation.image_files import DECODE_PIXELS, ImageFile
from moderation.images import ImageItem, ValueRange
from moderation.preprocess import ViewError, plan_views
from moderation.value_range import finite_min

# Knobs: one call is moderated in chunks of at most this many input pixels (their float32
# [0,1] copies and resize passes: ~12-30 bytes a pixel) and views (one vision forward each).
CHUNK_PIXELS = 1 << 25  # 33.5 MP, e.g. two 4096 x 4096 images or 128 of 512 x 512
CHUNK_VIEWS = 256


@dataclass
class Chunk:
    """Images start..start+count of a call, as the object to convert (a slice or a sub-list)."""

    start: int
    count: int
    images: Any = None
    lowest: list[torch.Tensor] | None = None  # the whole object's lowest value, when it is split


def split_call(
    images: Any,
    value_range: ValueRange,
    mode: str,
    size: int,
    *,
    max_pixels: int | None = None,
    max_views: int | None = None,
) -> list[Chunk]:
    """The caller's images in chunks of at most `max_pixels` (CHUNK_PIXELS) input pixels and
    `max_views` (CHUNK_VIEWS) views; an image larger than that is a chunk of its own.

    A batched tensor/array is split along its batch axis, its auto range decided once for the
    whole object (as an unsplit call decides it); a list is split between items.
    """
    max_pixels = max_pixels or CHUNK_PIXELS
    max_views = max_views or CHUNK_VIEWS
    single = not isinstance(images, (list, tuple))
    items = [images] if single else list(images)
    batched = single and isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4
    shapes = [s for item in items for s in item_shapes(item)]  # (frames, H, W) per image
    chunks: list[Chunk] = []
    start = pixels = views = 0
    for i, (frames, height, width) in enumerate(shapes):
        cost = frames * height * width if height else DECODE_PIXELS  # a file: at most its budget
        count = frames * _view_count(height, width, mode, size)
        if i > start and (pixels + cost > max_pixels or views + count > max_views):
            chunks.append(Chunk(start, i - start))
            start, pixels, views = i, 0, 0
        pixels, views = pixels + cost, views + count
    if shapes:
        chunks.append(Chunk(start, len(shapes) - start))
    lowest = None
    if batched and len(chunks) > 1 and value_range == "auto" and _is_float(images):
        lowest = [lowest_value(images, max_pixels)]
    for chunk in chunks:
        part = slice(chunk.start, chunk.start + chunk.count)
        if batched:
            chunk.images, chunk.lowest = images[part], lowest
        elif single:
            chunk.images = images
        else:
            chunk.images = items[part]
    return chunks


def join_results(outputs: list[Any], images: Any) -> Any:
    """Chunk results back as one object of the caller's kind (a batch, a list or one image)."""
    if isinstance(images, (list, tuple)):
        return [x for out in outputs for x in out]
    if len(outputs) == 1:
        return outputs[0]
    if isinstance(outputs[0], torch.Tensor):
        return torch.cat(outputs)
    return np.concatenate(outputs)


def _view_count(height: int, width: int, mode: str, size: int) -> int:
    """Views of one frame (1 for a size not known before decoding, or that cannot be covered)."""
    if not height or mode == "center":
        return 1
    try:
        return len(plan_views(height, width, mode, size))
    except ViewError:
        return 1


def _is_float(x: Any) -> bool:
    return x.dtype.is_floating_point if isinstance(x, torch.Tensor) else x.dtype != np.uint8


def item_shapes(item: ImageItem) -> list[tuple[int, int, int]]:
    """(frames, H, W) of each image one object holds, without decoding it; (1, 0, 0): unknown."""
    if isinstance(item, torch.Tensor):
        return [(1, *item.shape[-2:])] * (item.shape[0] if item.ndim == 4 else 1)
    if isinstance(item, np.ndarray):
        return [(1, *item.shape[-3:-1])] * (item.shape[0] if item.ndim == 4 else 1)
    if isinstance(item, ImageFile):
        return [tuple(item.frames.shape[i] for i in (0, 2, 3))]
    if isinstance(item, Image.Image):
        return [(1, item.size[1], item.size[0])]
    return [(1, 0, 0)]


def lowest_value(x: torch.Tensor | np.ndarray, max_pixels: int) -> torch.Tensor:
    """finite_min of a whole batch, reduced a few images at a time (bounded temporaries), so
    that every chunk of one object is read in the same range (value_range.auto_reading)."""
    step = max(1, max_pixels // max(1, x.shape[-2] * x.shape[-1]))
    parts = [x[i : i + step] for i in range(0, x.shape[0], step)]
    lows = [finite_min(p) for p in parts]
    return torch.stack([low.to(lows[0].device) for low in lows]).amin()
