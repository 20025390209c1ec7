"""Checks on the objects a caller passes as images, before anything is decoded or judged: one
`ImageInputError` line naming the object (`images`, or `image N` of a list) for anything the
engine cannot judge, never an error from deep inside torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from moderation.image_files import ImageFile, ImageInputError

VALUE_RANGES = ("auto", "-1,1", "0,1")


def check_value_range(value_range: Any) -> None:
    if value_range not in VALUE_RANGES:
        raise ImageInputError(f"value_range must be 'auto', '-1,1' or '0,1', got {value_range!r}")


def check_items(images: Any, value_range: str = "auto") -> None:
    """Raise ImageInputError for the first object to_image_batch would refuse (nothing decoded)."""
    check_value_range(value_range)
    single = not isinstance(images, (list, tuple))
    for i, item in enumerate([images] if single else images):
        label = "images" if single else f"image {i}"
        if isinstance(item, torch.Tensor):
            check_layout(item, label)
            if item.device.type == "meta":  # to_image_batch takes them: shapes only, no values
                raise ImageInputError(
                    f"{label}: a tensor on the meta device holds no pixel values to judge"
                )
        if isinstance(item, (torch.Tensor, np.ndarray)):
            check_shape(item, label, single, channels_last=isinstance(item, np.ndarray))
            check_dtype(item.dtype, label)
        elif not isinstance(item, (ImageFile, Image.Image, str, Path)):
            raise unsupported_type(item, label)


def check_layout(x: torch.Tensor, label: str) -> torch.Tensor:
    """Require an ordinary dense tensor: sparse and nested ones hold no [3,H,W] pixels as such."""
    if x.is_nested:
        raise ImageInputError(f"{label}: a nested tensor; pass a list of [3,H,W] tensors instead")
    if x.layout != torch.strided:
        layout = str(x.layout).removeprefix("torch.")
        raise ImageInputError(
            f"{label}: a {layout} tensor holds no dense pixels; pass x.to_dense() instead"
        )
    return x


def check_shape(x: Any, label: str, single: bool, *, channels_last: bool) -> Any:
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


def check_dtype(dtype: Any, label: str) -> bool:
    """True for float dtypes, False for uint8; anything else is an error."""
    if isinstance(dtype, torch.dtype):
        if dtype == torch.uint8 or dtype.is_floating_point:
            return dtype.is_floating_point
    elif dtype == np.uint8 or np.issubdtype(dtype, np.floating):
        return dtype != np.uint8
    raise ImageInputError(f"{label}: unsupported dtype {dtype} (expected uint8 or float)")


def unsupported_type(item: Any, label: str) -> ImageInputError:
    return ImageInputError(
        f"{label}: unsupported image type {type(item).__name__} "
        "(expected a tensor, numpy array, PIL image or file path)"
    )
