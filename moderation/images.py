"""Image inputs: conversion to [0,1] tensors (per-object value range), batches, hashing and PNG.

CLIP preprocessing and views live in `moderation.preprocess`, file decoding in
`moderation.image_files`; the names callers used from here are re-exported.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from moderation.image_checks import (
    check_dtype,
    check_layout,
    check_shape,
    check_value_range,
    unsupported_type,
)
from moderation.image_files import (
    ImageFile,
    ImageInputError,
    read_image,
)
from moderation.preprocess import CLIP_MEAN, CLIP_STD, TALL_CROPS, clip_pixels, clip_resize_size
from moderation.value_range import (
    NON_FINITE_INPUT,
    OUT_OF_RANGE_INPUT,
    auto_reading,
    finite_min,
    float_to_unit,
    reading_names,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "TALL_CROPS",
    "ImageBatch",
    "ImageFile",
    "ImageInputError",
    "batch_sha256",
    "clip_preprocess",
    "clip_resize_size",
    "encode_png",
    "image_sha256",
    "load_image_file",
    "read_image",
    "to_image_batch",
]

ValueRange = Literal["auto", "-1,1", "0,1"]
ImageItem = torch.Tensor | np.ndarray | Image.Image | ImageFile | str | Path
Images = torch.Tensor | list[torch.Tensor]  # [B,3,H,W] or B x [3,H,W], float [0,1]


@dataclass(frozen=True)
class _Source:
    """One object the caller passed, remembered so results go back in the same form."""

    kind: Literal["tensor", "numpy", "pil", "file"]
    start: int  # index of its first image in the batch
    count: int  # images it contributed
    batched: bool  # tensor/numpy given with a leading batch axis
    dtype: Any = None  # torch.dtype or np.dtype of the caller's object
    device: torch.device | None = None
    original: Any = None  # the caller's tensor/array, for to_caller(keep=...)


@dataclass
class ImageBatch:
    """Images as float [0,1] tensors on one device, plus what is needed to give results back."""

    images: Images  # [B,3,H,W] when all sizes agree, else B x [3,H,W]; float [0,1]
    invalid: torch.Tensor  # [B] bool on the device: not judgeable (NaN/inf or out of range)
    paths: list[str | None]  # file path per image, None for in-memory inputs
    signed: torch.Tensor | None  # [B] bool: read as [-1,1]; None without float inputs
    sources: list[_Source] = field(repr=False)
    single: bool = field(default=True, repr=False)  # caller passed one object, not a list
    out_of_range: torch.Tensor | None = field(default=None, repr=False)  # [B] bool
    # [B] bool: auto range could not tell [0,1] from [-1,1] (`images` holds the [0,1] reading,
    # `alternate(i)` the other); None when no float input was read with value_range="auto".
    ambiguous: torch.Tensor | None = field(default=None, repr=False)
    # Per image: the judged frames of an animation, [F,3,H,W] uint8 (frame 0 is `images[i]`),
    # and their numbers in the file; None for a still image.
    frames: list[torch.Tensor | None] = field(default_factory=list, repr=False)
    frame_numbers: list[tuple[int, ...] | None] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.images) if isinstance(self.images, list) else self.images.shape[0]

    @property
    def device(self) -> torch.device:
        """Device the images live on."""
        return self.invalid.device

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """(H, W) of every image."""
        if isinstance(self.images, torch.Tensor):
            return [tuple(self.images.shape[-2:])] * len(self)
        return [tuple(t.shape[-2:]) for t in self.images]

    def frames_of(self, index: int) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(frames [F,3,H,W] float [0,1] or uint8, frame numbers) that image `index` is judged on."""
        frames = self.frames[index] if self.frames else None
        if frames is None:
            return self.images[index].unsqueeze(0), (0,)
        return frames, self.frame_numbers[index]

    def invalid_indices(self) -> list[int]:
        """Indices of inputs that cannot be judged (one host sync)."""
        return torch.nonzero(self.invalid).flatten().tolist()

    def ambiguous_indices(self) -> list[int]:
        """Images to judge under both readings (one host sync, only after an auto range)."""
        if self.ambiguous is None:
            return []
        return torch.nonzero(self.ambiguous).flatten().tolist()

    def alternate(self, index: int) -> torch.Tensor:
        """[1,3,H,W]: image `index` read as [-1,1], from the caller's own values (an ambiguous
        image's `images[index]` is its [0,1] reading, clamped: the values below 0 are gone)."""
        s = next(s for s in self.sources if s.start <= index < s.start + s.count)
        part, _, _, _ = _read_item(s.original, "images", True, 0, self.device, {})
        j = index - s.start
        sign = torch.ones((), dtype=torch.bool, device=self.device)
        dtype = self.images[index].dtype
        unit, _, _ = float_to_unit(part[j : j + 1], sign, dtype, self.device)
        return unit

    def value_ranges(self) -> list[str | None]:
        """Per image, how its values were read: "0,1", "-1,1", "both" (ambiguous: judged under
        each reading), None for uint8, PIL images and files (one host transfer)."""
        n = len(self)
        if self.signed is None:
            return [None] * n
        ambiguous = self.ambiguous if self.ambiguous is not None else self.signed & False
        signed, both = torch.stack([self.signed, ambiguous]).cpu().tolist()
        floats = [False] * n
        for s in self.sources:
            if s.kind in ("tensor", "numpy") and s.dtype not in (torch.uint8, np.uint8):
                floats[s.start : s.start + s.count] = [True] * s.count
        return reading_names(floats, signed, both)

    def input_errors(self) -> list[str | None]:
        """Per image, why its input cannot be judged (None: it can); one host transfer."""
        ranged = self.out_of_range if self.out_of_range is not None else self.invalid & False
        invalid, ranged = torch.stack([self.invalid, ranged]).cpu().tolist()
        return [
            (OUT_OF_RANGE_INPUT if r else NON_FINITE_INPUT) if bad else None
            for bad, r in zip(invalid, ranged, strict=True)
        ]

    def to_caller(self, images: Images | None = None, *, keep: Any = None) -> Any:
        """Return `images` (default: this batch's) in the caller's own format, range and device.

        Tensors come back with the original dtype, device, range and batch axis; numpy arrays in
        their layout and dtype; PIL images and files as RGB PIL images (an animation as its
        first frame). `keep` ([B] bool) returns the caller's own tensor/array for those images,
        bit for bit (uint8 inputs round-trip exactly anyway; a [-1,1] float may not).
        """
        images = self.images if images is None else images
        if len(images) != len(self):
            raise ImageInputError(f"to_caller: got {len(images)} images for a batch of {len(self)}")
        if keep is not None:
            keep = torch.as_tensor(keep, dtype=torch.bool)
        out = [self._source_to_caller(s, images, keep) for s in self.sources]
        return out[0] if self.single else out

    def _source_to_caller(self, s: _Source, images: Images, keep: torch.Tensor | None) -> Any:
        part = _take(images, s.start, s.count)  # [n,3,H,W] float [0,1]
        kept = None if keep is None else keep[s.start : s.start + s.count]
        signed = None if self.signed is None else self.signed[s.start : s.start + s.count]
        if s.kind == "tensor":
            if kept is not None and kept.device.type == "cpu" and bool(kept.all()):
                return s.original
            if s.dtype == torch.uint8:
                out = _to_uint8(part)
            else:  # a float input always comes with a range decision
                out = torch.where(signed.to(part.device)[:, None, None, None], part * 2 - 1, part)
            out = out.to(device=s.device, dtype=s.dtype)
            if kept is not None:
                original = s.original if s.batched else s.original.unsqueeze(0)
                out = torch.where(kept.to(s.device)[:, None, None, None], original, out)
            return out if s.batched else out[0]
        if s.kind in ("pil", "file"):
            return Image.fromarray(_to_uint8(part[0]).permute(1, 2, 0).cpu().numpy())
        if s.dtype == np.uint8:
            hwc = _to_uint8(part).permute(0, 2, 3, 1).cpu().numpy()  # [n,H,W,3]
        else:
            hwc = part.permute(0, 2, 3, 1).float().cpu().numpy()
            hwc = np.where(signed.cpu().numpy()[:, None, None, None], hwc * 2 - 1, hwc)
            hwc = hwc.astype(s.dtype)
        if kept is not None:
            original = s.original if s.batched else s.original[None]
            hwc = np.where(kept.cpu().numpy()[:, None, None, None], original, hwc)
        return hwc if s.batched else hwc[0]


def to_image_batch(
    images: ImageItem | Sequence[ImageItem],
    *,
    device: torch.device | str | None = None,
    value_range: ValueRange = "auto",
    dtype: torch.dtype = torch.float32,
    lowest: Sequence[torch.Tensor | None] | None = None,
    max_pixels: int | None = None,
    decode_pixels: int | None = None,
    max_frames: int | None = None,
) -> ImageBatch:
    """Convert a tensor, numpy array, PIL image, file path, ImageFile, or a list of them.

    Float inputs (tensors and numpy arrays) are read as [-1,1] or [0,1]; a declared `value_range`
    always wins. With `value_range="auto"` the decision is made per object the caller passed,
    from its lowest finite value (a batched tensor is one generator's output, so one decision
    for all its images; each item of a list decides for itself): at or below
    -value_range.SIGNED_EVIDENCE, [-1,1]; at or above 0, [0,1]; in between, ambiguous
    (`ambiguous`: `images` holds the [0,1] reading, `alternate(i)` the [-1,1] one, and the
    engine judges both). It is an on-device reduction, no host sync. `lowest` (per item, a 0-d
    tensor or None) gives the lowest value of the whole object an item was cut from, for one
    object split in chunks. Overshoot (a VAE's output a little beyond [-1,1]) is clamped; an
    image with values more than RANGE_SLACK beyond its range (0-255 floats) and NaN/inf are
    zeroed and flagged in `invalid`
    (the engine gives them an error decision). uint8 is always 0..255. Files and PIL images are
    decoded by `read_image` (its budgets: `max_pixels`, `decode_pixels`, `max_frames`; bit
    depth; animation frames). `device` defaults to the
    first tensor's device, else the CPU.
    """
    check_value_range(value_range)
    single = not isinstance(images, (list, tuple))
    items = [images] if single else list(images)
    if device is None:
        device = next((x.device for x in items if isinstance(x, torch.Tensor)), torch.device("cpu"))
    device = torch.device(device)
    decode = {"max_pixels": max_pixels, "decode_pixels": decode_pixels, "max_frames": max_frames}

    converted, nonfinite, ranged, signs, maybes = [], [], [], [], []
    sources: list[_Source] = []
    paths: list[str | None] = []
    frames: list[torch.Tensor | None] = []
    numbers: list[tuple[int, ...] | None] = []
    any_float = False
    for i, item in enumerate(items):
        label = "images" if single else f"image {i}"
        part, is_float, source, file = _read_item(item, label, single, len(paths), device, decode)
        n = part.shape[0]
        no = torch.zeros(n, dtype=torch.bool, device=device)
        if is_float:
            any_float = True
            if value_range == "auto":
                low = lowest[i] if lowest is not None and lowest[i] is not None else None
                sign, maybe = auto_reading(finite_min(part) if low is None else low.to(device))
            else:
                sign = torch.tensor(value_range == "-1,1", device=device)
                maybe = torch.zeros((), dtype=torch.bool, device=device)
            part, bad, far = float_to_unit(part, sign, dtype, device)
            nonfinite.append(bad)
            ranged.append(far)
            signs.append(sign.expand(n))
            maybes.append(maybe.expand(n))
        else:
            part = part.to(device=device, dtype=dtype).div_(255)
            nonfinite.append(no)
            ranged.append(no)
            signs.append(no)
            maybes.append(no)
        converted.append(part)
        sources.append(source)
        paths.extend([file.path if file is not None else None] * n)
        animated = file is not None and file.frames.shape[0] > 1
        frames.extend([file.frames.to(device) if animated else None] * n)
        numbers.extend([file.frame_numbers if animated else None] * n)

    sizes = {tuple(p.shape[-2:]) for p in converted}
    if len(sizes) <= 1:
        empty = torch.empty(0, 3, 0, 0, dtype=dtype, device=device)
        out: Images = converted[0] if len(converted) == 1 else torch.cat(converted or [empty])
    else:
        out = [t for p in converted for t in p.unbind(0)]

    def cat(masks: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool, device=device)

    far = cat(ranged)
    batch = ImageBatch(
        out, cat(nonfinite) | far, paths, cat(signs) if any_float else None, sources, single
    )
    batch.out_of_range, batch.frames, batch.frame_numbers = far, frames, numbers
    if any_float and value_range == "auto":
        batch.ambiguous = cat(maybes)
    return batch


def _read_item(
    item: Any, label: str, single: bool, start: int, device: torch.device, decode: dict
) -> tuple[torch.Tensor, bool, _Source, ImageFile | None]:
    """One caller object -> ([n,3,H,W], is_float, source, decoded file); not yet converted."""
    if isinstance(item, torch.Tensor):
        t = check_shape(check_layout(item, label), label, single, channels_last=False)
        is_float = check_dtype(item.dtype, label)
        part = t if t.ndim == 4 else t.unsqueeze(0)
        source = _Source("tensor", start, part.shape[0], t.ndim == 4, t.dtype, t.device, item)
        return part, is_float, source, None
    if isinstance(item, np.ndarray):
        a = check_shape(item, label, single, channels_last=True)
        is_float = check_dtype(a.dtype, label)
        array = np.ascontiguousarray(a)
        hwc = torch.from_numpy(array if array.flags.writeable else array.copy())
        part = hwc.reshape(-1, *a.shape[-3:]).permute(0, 3, 1, 2)
        source = _Source("numpy", start, part.shape[0], a.ndim == 4, a.dtype, None, item)
        return part, is_float, source, None
    if isinstance(item, ImageFile):
        file, kind = item, "file"
    elif isinstance(item, Image.Image):
        file, kind = read_image(item, **decode), "pil"
    elif isinstance(item, (str, Path)):
        file, kind = read_image(item, **decode), "file"
    else:
        raise unsupported_type(item, label)
    return file.frames[:1], False, _Source(kind, start, 1, False), file


def load_image_file(path: str | Path, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Read an image file as a float [0,1] tensor [3,H,W] (an animation's first frame)."""
    return read_image(path).frames[0].to(torch.device(device), torch.float32).div_(255)


def clip_preprocess(
    images: Images | ImageBatch,
    *,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """CLIP pixel values [B,3,size,size] of the images' centre crops (`preprocess.clip_pixels`).

    Given an ImageBatch, rows of inputs that cannot be judged are NaN, so they fail closed.
    """
    if isinstance(images, ImageBatch):
        return clip_pixels(images.images, size=size, mean=mean, std=std, invalid=images.invalid)
    return clip_pixels(images, size=size, mean=mean, std=std)


def _take(images: Images, start: int, count: int) -> torch.Tensor:
    """Images start..start+count as one [n,3,H,W] tensor."""
    if isinstance(images, torch.Tensor):
        return images[start : start + count]
    return torch.stack(images[start : start + count])


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0,1] float -> uint8 with round-half-even; exact IEEE ops, so equal on every device."""
    x = torch.nan_to_num(x.float(), nan=0.0)  # our copy: the rest works in place
    return x.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


# --- hashing and PNG ----------------------------------------------------------------------------


def _hash_hwc(hwc: np.ndarray) -> str:
    height, width, _ = hwc.shape
    digest = hashlib.sha256(f"rgb8:{height}x{width}\n".encode())
    digest.update(np.ascontiguousarray(hwc).tobytes())
    return digest.hexdigest()


def image_sha256(image: torch.Tensor) -> str:
    """sha256 of `rgb8:{H}x{W}\\n` + the uint8 RGB HWC bytes of a [3,H,W] [0,1] image."""
    return _hash_hwc(_to_uint8(image).permute(1, 2, 0).cpu().numpy())


def batch_sha256(images: Images) -> list[str]:
    """image_sha256 of every image, with one device-to-host copy for the whole batch."""
    items = list(images.unbind(0)) if isinstance(images, torch.Tensor) else list(images)
    if not items:
        return []
    flat = torch.cat([_to_uint8(t).permute(1, 2, 0).flatten() for t in items]).cpu().numpy()
    hashes, offset = [], 0
    for t in items:
        height, width = t.shape[-2:]
        n = height * width * 3
        hashes.append(_hash_hwc(flat[offset : offset + n].reshape(height, width, 3)))
        offset += n
    return hashes


def encode_png(image: torch.Tensor) -> bytes:
    """PNG bytes of a [3,H,W] [0,1] image (quantised to uint8 as image_sha256 does)."""
    buffer = io.BytesIO()
    Image.fromarray(_to_uint8(image).permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()
