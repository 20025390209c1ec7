"""CLIP preprocessing in torch, and the square views an image is judged on.

Everything runs on the images' own device, batched, without PIL: bicubic + antialias resizing
(PIL's filter, one axis at a time), crops and CLIP's mean/std.

Views (the policy's `views:` key):
- `center`: CLIP's own preprocessing, one centre crop of the shortest side (what diffusers' safety
  checker sees; `compat: diffusers` keeps it). The strips beyond the crop are not seen.
- `cover` (the default): the shortest side is resized to the encoder's size S and the long side is
  cut into ceil(L / S) overlapping S x S crops, evenly spaced, the first and the last flush with
  the edges, so every pixel is seen. A square image is one view, equal to the centre crop.
- `tiles`: the cover views, plus tiles of half the shortest side overlapping by half a tile (the
  short side resized to 2S, cut in S x S crops every S/2): 3 tiles across the short side. Small
  content fills 4x more of a tile than of a cover view, which counters dilution. Cost: 1:1 is
  1 + 9 = 10 views, 2:3 is 2 + 15, 9:16 is 2 + 21.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from moderation.errors import ModerationError
from policy.vocabulary import VIEWS, View

if TYPE_CHECKING:
    from moderation.images import ImageBatch

# OpenAI CLIP normalisation (equal to transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Above this height/crop ratio, resample tall images vertically first (memory, see below).
TALL_CROPS = 16

ViewMode = View
# Knob: most cover views one frame may need, i.e. the most extreme aspect ratio judged (16:1).
# Beyond it an image is not judged (error, on_error applies) rather than judged on part of it.
MAX_COVER_VIEWS = 16
# Knob: tiles are cut from the frame resized so that its short side is TILE_SCALE x S.
TILE_SCALE = 2
# Knob: pixels of the frames resized in one call (bounds the memory of the resize passes).
RESIZE_PIXELS = 1 << 24


class ViewError(ModerationError):
    """An image cannot be covered by the views its policy asks for."""


@dataclass(frozen=True)
class ViewPlan:
    """The square views of one frame size: where the frame is resized to and cut."""

    height: int  # source size
    width: int
    levels: tuple[tuple[tuple[int, int], tuple[tuple[int, int], ...]], ...]
    # per level: ((resized height, resized width), ((top, left) of each S x S crop, ...))
    boxes: tuple[tuple[int, int, int, int], ...]  # [left, top, right, bottom] in source pixels

    def __len__(self) -> int:
        return len(self.boxes)


def clip_resize_size(height: int, width: int, size: int = 224) -> tuple[int, int]:
    """Size after resizing the shortest side to `size`, computed exactly as transformers does."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)  # transformers truncates; keep the float expression
    return (new_long, size) if width <= height else (size, new_long)


def _spaced(length: int, crop: int, count: int) -> list[int]:
    """`count` offsets of a `crop` window in `length`, evenly spaced, first 0 and last flush."""
    if count == 1:
        return [(length - crop) // 2]
    return [round(k * (length - crop) / (count - 1)) for k in range(count)]


@functools.lru_cache(maxsize=1024)
def plan_views(height: int, width: int, mode: ViewMode, size: int = 224) -> ViewPlan:
    """The views of a `height` x `width` frame for an encoder of input `size` (see module doc)."""
    if mode not in VIEWS:
        raise ViewError(f"views must be one of {', '.join(VIEWS)}, got {mode!r}")
    new_h, new_w = clip_resize_size(height, width, size)
    if mode == "center":
        crops = (((new_h - size) // 2, (new_w - size) // 2),)
        levels = [((new_h, new_w), crops)]
    else:
        count = math.ceil(max(new_h, new_w) / size)
        if count > MAX_COVER_VIEWS:
            raise ViewError(
                f"a {width}x{height} image needs {count} views to be seen whole, more than the "
                f"{MAX_COVER_VIEWS} allowed (aspect ratio beyond {MAX_COVER_VIEWS}:1)"
            )
        tops = _spaced(new_h, size, count) if new_h > new_w else [0]
        lefts = _spaced(new_w, size, count) if new_w > new_h else [0]
        levels = [((new_h, new_w), tuple((t, x) for t in tops for x in lefts))]
        if mode == "tiles":
            big_h, big_w = clip_resize_size(height, width, TILE_SCALE * size)
            stride = size / 2  # half a tile of overlap
            tops = _spaced(big_h, size, math.ceil((big_h - size) / stride) + 1)
            lefts = _spaced(big_w, size, math.ceil((big_w - size) / stride) + 1)
            levels.append(((big_h, big_w), tuple((t, x) for t in tops for x in lefts)))
    boxes = []
    for (rh, rw), crops in levels:
        for top, left in crops:
            boxes.append(
                (
                    round(max(left, 0) * width / rw),
                    round(max(top, 0) * height / rh),
                    round(min(left + size, rw) * width / rw),
                    round(min(top + size, rh) * height / rh),
                )
            )
    return ViewPlan(height, width, tuple(levels), tuple(boxes))


def clip_pixels(
    images: torch.Tensor | Sequence[torch.Tensor],
    *,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    invalid: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP pixel values [B,3,size,size] (float32) of images' centre crops, on their device.

    Matches `CLIPImageProcessor` (shortest side to `size` with bicubic + antialias, centre crop,
    mean/std). Images of different sizes are processed in one call per size. Rows where `invalid`
    ([B] bool) is set are filled with NaN, so their embeddings fail closed downstream.
    """
    if isinstance(images, torch.Tensor):
        x = images if images.ndim == 4 else images.unsqueeze(0)
        out = _clip_same_size(x, size, mean, std)
    elif not images:
        out = torch.empty(0, 3, size, size, device=invalid.device if invalid is not None else None)
    else:
        out = torch.empty(len(images), 3, size, size, device=images[0].device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(images):
            groups.setdefault(tuple(t.shape[-2:]), []).append(i)
        for idx in groups.values():
            group = torch.stack([images[i] for i in idx])
            out[torch.tensor(idx, device=out.device)] = _clip_same_size(group, size, mean, std)
    if invalid is not None:
        out = out.masked_fill(invalid[:, None, None, None], float("nan"))
    return out


def _clip_same_size(
    x: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """[B,3,H,W] in [0,1] (or uint8) -> normalised centre crops [B,3,size,size] float32."""
    x = x.float() if x.is_floating_point() else x.float() / 255
    if x.shape[0] == 0:
        return x.new_empty(0, 3, size, size)
    height, width = x.shape[-2:]
    new_h, new_w = clip_resize_size(height, width, size)
    top, left = (new_h - size) // 2, (new_w - size) // 2  # floor, like transformers' center_crop
    # PIL resamples horizontally, then vertically, clipping to 0..255 in between; so do we (one
    # 2-D pass differs by up to 14/255 at edges). Cropping between the passes is exact, as each
    # pass treats rows (columns) independently, and it bounds memory by size x long side. A tall
    # image whose vertical output would exceed TALL_CROPS crops goes vertical-first for the same
    # reason; that only moves where overshoot is clipped (Pillow 13 picks the order per image too).
    if new_h > TALL_CROPS * size:
        x = _resize_axis(x, new_h, axis=-2)[..., top : top + size, :]
        x = _resize_axis(x, new_w, axis=-1)[..., left : left + size]
    else:
        x = _resize_axis(x, new_w, axis=-1)[..., left : left + size]
        x = _resize_axis(x, new_h, axis=-2)[..., top : top + size, :]
    return _normalise(x, mean, std)


def view_pixels(
    frames: torch.Tensor,
    plan: ViewPlan,
    *,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """CLIP pixel values [G*V,3,size,size] of the V views of G same-size frames, frame-major.

    frames: [G,3,H,W] float in [0,1] or uint8, on any device; the views of frame g are rows
    g*V .. g*V+V-1, in the order of `plan.boxes`. Frames are resized a few at a time, so a large
    group costs the memory of RESIZE_PIXELS, not of the whole group in float32.
    """
    groups, height, width = frames.shape[0], frames.shape[-2], frames.shape[-1]
    out = torch.empty(groups * len(plan), 3, size, size, device=frames.device)
    step = max(1, RESIZE_PIXELS // max(height * width, 1))
    for start in range(0, groups, step):
        x = frames[start : start + step]
        x = x.float() if x.is_floating_point() else x.float() / 255
        crops = []
        for (new_h, new_w), offsets in plan.levels:
            resized = _resize(x, new_h, new_w)  # [g,3,new_h,new_w]
            crops += [resized[..., t : t + size, c : c + size] for t, c in offsets]
        views = torch.stack(crops, dim=1).flatten(0, 1)  # [g*V,3,S,S]
        out[start * len(plan) : start * len(plan) + views.shape[0]] = _normalise(views, mean, std)
    return out


def _resize(x: torch.Tensor, new_h: int, new_w: int) -> torch.Tensor:
    """[B,3,H,W] -> [B,3,new_h,new_w], bicubic + antialias one axis at a time, as PIL does."""
    if new_h > TALL_CROPS * new_w:  # the horizontal pass's output would be the large one
        return _resize_axis(_resize_axis(x, new_h, axis=-2), new_w, axis=-1)
    return _resize_axis(_resize_axis(x, new_w, axis=-1), new_h, axis=-2)


def _normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def _resize_axis(x: torch.Tensor, length: int, *, axis: int) -> torch.Tensor:
    """Bicubic antialiased resize of one axis of [B,3,H,W] (PIL's filter), clamped to [0,1]."""
    if x.shape[axis] == length:
        return x
    target = (length, x.shape[-1]) if axis == -2 else (x.shape[-2], length)
    return F.interpolate(x, size=target, mode="bicubic", antialias=True).clamp_(0, 1)


def judged_views(
    frames: Sequence[tuple[torch.Tensor, Sequence[int]]],
    invalid: torch.Tensor,
    mode: ViewMode,
    *,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> tuple[torch.Tensor, torch.Tensor | None, list[list[dict]], list[str | None]]:
    """The views of a batch: every view of every judged frame of every image, in one tensor.

    frames: per image (its frames [F,3,H,W] float [0,1] or uint8, their numbers); invalid: [B]
    bool. Returns (pixels [N,3,S,S], owners [N] (None when every image has one view),
    descriptors {"frame", "box"} per image, error per image). Rows of an invalid image are NaN;
    an image that cannot be covered (ViewError) gets one NaN row and its error.
    """
    device = invalid.device
    plans: list[ViewPlan | None] = []
    errors: list[str | None] = []
    for image, _ in frames:
        try:
            plans.append(plan_views(*image.shape[-2:], mode, size))
            errors.append(None)
        except ViewError as exc:
            plans.append(None)
            errors.append(str(exc))
    counts = [len(p) * f.shape[0] if p else 1 for p, (f, _) in zip(plans, frames, strict=True)]
    starts = [0, *itertools.accumulate(counts)]
    out = torch.full((starts[-1], 3, size, size), float("nan"), device=device)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, plan in enumerate(plans):
        if plan is not None:
            groups.setdefault((plan.height, plan.width), []).append(i)
    for (height, width), members in groups.items():
        plan = plans[members[0]]
        # Frames of the same size go through the resize together, RESIZE_PIXELS at a time.
        step = max(1, RESIZE_PIXELS // (height * width))
        pending: list[tuple[int, torch.Tensor]] = []  # (image, frames) of one resize call
        for index, i in enumerate(members):
            pending.append((i, frames[i][0]))
            if sum(f.shape[0] for _, f in pending) >= step or index == len(members) - 1:
                stack = torch.cat([f.to(device) for _, f in pending])  # [G,3,H,W]
                rows = [r for j, _ in pending for r in range(starts[j], starts[j + 1])]
                pixels = view_pixels(stack, plan, size=size, mean=mean, std=std)
                out[torch.tensor(rows, device=device)] = pixels
                pending = []
    owners = None
    if any(c != 1 for c in counts):
        owners = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        owners = owners.to(device)
    row_owner = owners if owners is not None else torch.arange(len(counts), device=device)
    out = out.masked_fill(invalid[row_owner][:, None, None, None], float("nan"))
    descriptors = []
    for (image, numbers), plan in zip(frames, plans, strict=True):
        if plan is None:
            descriptors.append([{"frame": 0, "box": [0, 0, image.shape[-1], image.shape[-2]]}])
            continue
        descriptors.append(
            [{"frame": int(n), "box": list(box)} for n in numbers for box in plan.boxes]
        )
    return out, owners, descriptors, errors


def batch_views(
    batch: ImageBatch,
    mode: ViewMode,
    *,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> tuple[torch.Tensor, torch.Tensor | None, list[list[dict]] | None, list[str | None]]:
    """The views an ImageBatch is judged on: `judged_views` of every judged frame (under
    `center`, an animation's frames are centre-cropped too), or CLIP's own centre crop, bit for
    bit, when every image is one still frame read one way. Returns (pixels [N,3,S,S], owners,
    descriptors (None: CLIP's centre crop), error per image), as judged_views.

    An image whose value range is ambiguous is judged under both readings: the views of its
    [0,1] reading, then those of its [-1,1] one, each descriptor saying which ("range"), so
    each concept takes its highest cosine over both (the most severe reading decides).
    """
    animated = any(f is not None for f in batch.frames)
    ambiguous = batch.ambiguous_indices()  # a host sync, only after an auto range
    center = mode == "center" and not animated
    if center and not ambiguous:
        pixels = clip_pixels(batch.images, size=size, mean=mean, std=std, invalid=batch.invalid)
        return pixels, None, None, [None] * len(batch)
    frames = [batch.frames_of(i) for i in range(len(batch))]
    for i in ambiguous:
        shown, numbers = frames[i]
        frames[i] = (torch.cat([shown, batch.alternate(i).to(shown.dtype)]), (*numbers, *numbers))
    pixels, owners, views, errors = judged_views(
        frames, batch.invalid, mode, size=size, mean=mean, std=std
    )
    for i in ambiguous:
        half = len(views[i]) // 2
        views[i] = [{**v, "range": "0,1" if k < half else "-1,1"} for k, v in enumerate(views[i])]
    if center:  # the others keep their one whole view, as on the fast path
        views = [v if i in ambiguous else None for i, v in enumerate(views)]
    return pixels, owners, views, errors
