"""Image inputs: conversion to [0,1] tensors, CLIP preprocessing in torch, hashing and PNG."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from moderation.errors import ModerationError

# OpenAI CLIP normalisation (equal to transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Above this height/crop ratio, resample tall images vertically first (memory, see below).
TALL_CROPS = 16

ValueRange = Literal["auto", "-1,1", "0,1"]
ImageItem = torch.Tensor | np.ndarray | Image.Image | str | Path
Images = torch.Tensor | list[torch.Tensor]  # [B,3,H,W] or B x [3,H,W], float [0,1]


class ImageInputError(ModerationError):
    """An input image cannot be read, or has the wrong type, shape or dtype."""


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
    invalid: torch.Tensor  # [B] bool on the device: input held NaN/inf (zeroed here); fail closed
    paths: list[str | None]  # file path per image, None for in-memory inputs
    signed: torch.Tensor | None  # 0-d bool: float inputs were read as [-1,1]; None without floats
    sources: list[_Source] = field(repr=False)
    single: bool = field(default=True, repr=False)  # caller passed one object, not a list

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

    def invalid_indices(self) -> list[int]:
        """Indices of non-finite inputs (one host sync)."""
        return torch.nonzero(self.invalid).flatten().tolist()

    def to_caller(self, images: Images | None = None, *, keep: Any = None) -> Any:
        """Return `images` (default: this batch's) in the caller's own format, range and device.

        Tensors come back with the original dtype, device, range and batch axis; numpy arrays in
        their layout and dtype; PIL images and files as RGB PIL images. `keep` ([B] bool) returns
        the caller's own tensor/array for those images, bit for bit (uint8 inputs round-trip
        exactly anyway; a [-1,1] float may not).
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
        if s.kind == "tensor":
            if s.dtype == torch.uint8:
                out = _to_uint8(part)
            else:  # a float input always comes with a range decision
                out = torch.where(self.signed, part * 2 - 1, part)
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
            if self.signed is not None and bool(self.signed):
                hwc = hwc * 2 - 1
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
) -> ImageBatch:
    """Convert a tensor, numpy array, PIL image, file path, or a list of them, to an ImageBatch.

    Float inputs (tensors and numpy arrays) are read as [-1,1] or [0,1]. With `value_range="auto"`
    one decision is made for the whole call: [-1,1] if any finite value of any float input is
    below 0, else [0,1]. It is a single on-device reduction, no host sync; a [0,1] image is never
    negative, while a [-1,1] batch is almost never entirely non-negative. uint8 is always 0..255.
    Values outside the range are clamped; NaN/inf are zeroed and flagged in `invalid`.
    `device` defaults to the first tensor's device, else the CPU.
    """
    if value_range not in ("auto", "-1,1", "0,1"):
        raise ImageInputError(f"value_range must be 'auto', '-1,1' or '0,1', got {value_range!r}")
    single = not isinstance(images, (list, tuple))
    items = [images] if single else list(images)
    if device is None:
        device = next((x.device for x in items if isinstance(x, torch.Tensor)), torch.device("cpu"))
    device = torch.device(device)

    parts: list[tuple[torch.Tensor, bool]] = []  # ([n,3,H,W] on device, is_float)
    sources: list[_Source] = []
    paths: list[str | None] = []
    for i, item in enumerate(items):
        label = "images" if single else f"image {i}"
        part, is_float, source = _read_item(item, label, single, len(paths), device, dtype)
        parts.append((part, is_float))
        sources.append(source)
        paths.extend([str(item) if source.kind == "file" else None] * source.count)

    floats = [p for p, is_float in parts if is_float]
    signed = None
    if floats and value_range == "auto":
        signed = torch.stack([((p < 0) & torch.isfinite(p)).any() for p in floats]).any()
    elif floats:
        signed = torch.tensor(value_range == "-1,1", device=device)

    converted, invalid = [], []
    for part, is_float in parts:
        bad = torch.zeros(part.shape[0], dtype=torch.bool, device=device)
        if is_float:
            finite = torch.isfinite(part)
            bad = ~finite.flatten(1).all(1)
            part = torch.where(finite, part, torch.zeros((), dtype=dtype, device=device))
            part = torch.where(signed, part * 0.5 + 0.5, part).clamp_(0, 1)
        converted.append(part)
        invalid.append(bad)

    sizes = {tuple(p.shape[-2:]) for p in converted}
    if len(sizes) <= 1:
        empty = torch.empty(0, 3, 0, 0, dtype=dtype, device=device)
        out: Images = converted[0] if len(converted) == 1 else torch.cat(converted or [empty])
    else:
        out = [t for p in converted for t in p.unbind(0)]
    mask = torch.cat(invalid) if invalid else torch.zeros(0, dtype=torch.bool, device=device)
    return ImageBatch(out, mask, paths, signed, sources, single)


def _read_item(
    item: Any, label: str, single: bool, start: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, bool, _Source]:
    """One caller object -> ([n,3,H,W] on device, is_float, source); float range not yet applied."""
    if isinstance(item, torch.Tensor):
        t = _check_shape(item, label, single, channels_last=False)
        is_float = _check_dtype(item.dtype, label)
        part = t.to(device) if t.ndim == 4 else t.to(device).unsqueeze(0)
        source = _Source("tensor", start, part.shape[0], t.ndim == 4, t.dtype, t.device, item)
        return _scale(part, is_float, dtype), is_float, source
    if isinstance(item, np.ndarray):
        a = _check_shape(item, label, single, channels_last=True)
        is_float = _check_dtype(a.dtype, label)
        array = np.ascontiguousarray(a)
        hwc = torch.from_numpy(array if array.flags.writeable else array.copy())
        part = hwc.to(device).reshape(-1, *a.shape[-3:]).permute(0, 3, 1, 2)
        source = _Source("numpy", start, part.shape[0], a.ndim == 4, a.dtype, None, item)
        return _scale(part, is_float, dtype), is_float, source
    if isinstance(item, Image.Image):
        rgb, kind = _pil_to_rgb(item), "pil"
    elif isinstance(item, (str, Path)):
        rgb, kind = _open_rgb(item), "file"
    else:
        raise ImageInputError(
            f"{label}: unsupported image type {type(item).__name__} "
            "(expected a tensor, numpy array, PIL image or file path)"
        )
    part = _pil_to_tensor(rgb, device, dtype).unsqueeze(0)
    return part, False, _Source(kind, start, 1, False)


def _check_shape(x: Any, label: str, single: bool, *, channels_last: bool) -> Any:
    """Require [3,H,W] / [B,3,H,W] (tensors) or [H,W,3] / [B,H,W,3] (arrays)."""
    layout = "[H,W,3]" if channels_last else "[3,H,W]"
    shape = list(x.shape)
    if x.ndim == 4 and not single:
        raise ImageInputError(f"{label}: expected one image {layout} in a list, got shape {shape}")
    if x.ndim not in (3, 4):
        raise ImageInputError(f"{label}: expected an image of shape {layout}, got shape {shape}")
    channels = shape[-1] if channels_last else shape[-3]
    if channels != 3:
        raise ImageInputError(f"{label}: expected 3 channels, got {channels}")
    if 0 in (shape[-3:-1] if channels_last else shape[-2:]):
        raise ImageInputError(f"{label}: empty image of shape {shape}")
    return x


def _check_dtype(dtype: Any, label: str) -> bool:
    """True for float dtypes, False for uint8; anything else is an error."""
    if isinstance(dtype, torch.dtype):
        if dtype == torch.uint8 or dtype.is_floating_point:
            return dtype.is_floating_point
    elif dtype == np.uint8 or np.issubdtype(dtype, np.floating):
        return dtype != np.uint8
    raise ImageInputError(f"{label}: unsupported dtype {dtype} (expected uint8 or float)")


def _scale(part: torch.Tensor, is_float: bool, dtype: torch.dtype) -> torch.Tensor:
    return part.to(dtype) if is_float else part.to(dtype) / 255


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """RGB like transformers' do_convert_rgb: transparency is composited onto white."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _pil_to_tensor(image: Image.Image, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    hwc = torch.from_numpy(np.array(image, dtype=np.uint8))  # [H,W,3]
    return hwc.to(device).permute(2, 0, 1).to(dtype) / 255


def _open_rgb(path: str | Path) -> Image.Image:
    """Open any format PIL reads, honour EXIF orientation, convert to RGB; errors name the file."""
    try:
        with Image.open(path) as image:
            image.load()
            try:
                # Viewers apply EXIF orientation; moderate what people will see.
                image = ImageOps.exif_transpose(image)
            except (ValueError, TypeError, OSError, SyntaxError):
                pass  # a broken EXIF block must not make the picture unreadable
            return _pil_to_rgb(image)
    except FileNotFoundError:
        raise ImageInputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageInputError(f"{path}: is a directory") from None
    except PermissionError:
        raise ImageInputError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageInputError(f"{path}: cannot identify image file") from None
    except Image.DecompressionBombError as exc:
        raise ImageInputError(f"{path}: image too large ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageInputError(f"{path}: cannot read image ({exc})") from None


def load_image_file(path: str | Path, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Read an image file as a float [0,1] tensor [3,H,W]."""
    return _pil_to_tensor(_open_rgb(path), torch.device(device), torch.float32)


def _take(images: Images, start: int, count: int) -> torch.Tensor:
    """Images start..start+count as one [n,3,H,W] tensor."""
    if isinstance(images, torch.Tensor):
        return images[start : start + count]
    return torch.stack(images[start : start + count])


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0,1] float -> uint8 with round-half-even; exact IEEE ops, so equal on every device."""
    x = torch.nan_to_num(x.float(), nan=0.0)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


# --- CLIP preprocessing -------------------------------------------------------------------------


def clip_resize_size(height: int, width: int, size: int = 224) -> tuple[int, int]:
    """Size after resizing the shortest side to `size`, computed exactly as transformers does."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)  # transformers truncates; keep the float expression
    return (new_long, size) if width <= height else (size, new_long)


def clip_preprocess(
    images: Images | ImageBatch,
    *,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """CLIP pixel values [B,3,size,size] (float32) on the images' device, without PIL.

    Matches `CLIPImageProcessor` (shortest side to `size` with bicubic + antialias, centre crop,
    mean/std). Images of different sizes are processed in one call per size. Given an ImageBatch,
    rows of non-finite inputs are filled with NaN so their embeddings fail closed downstream.
    """
    invalid = None
    if isinstance(images, ImageBatch):
        images, invalid = images.images, images.invalid
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
    """[B,3,H,W] in [0,1] (or uint8) -> normalised [B,3,size,size] float32."""
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
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def _resize_axis(x: torch.Tensor, length: int, *, axis: int) -> torch.Tensor:
    """Bicubic antialiased resize of one axis of [B,3,H,W] (PIL's filter), clamped to [0,1]."""
    if x.shape[axis] == length:
        return x
    target = (length, x.shape[-1]) if axis == -2 else (x.shape[-2], length)
    return F.interpolate(x, size=target, mode="bicubic", antialias=True).clamp_(0, 1)


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
