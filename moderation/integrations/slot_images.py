"""Images in the diffusers slot: what a pipeline hands its checker, and acted images written back
in the pipeline's own layout and range."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from moderation.actions import apply_actions, policy_settings
from moderation.errors import ModerationError
from moderation.image_files import ImageInputError
from policy.compiled import CompiledPolicy


def count_images(images: Any) -> int:
    """How many images diffusers handed over (a batch or a list); anything else is refused."""
    try:
        return len(images)
    except TypeError:
        raise ModerationError(
            f"images: expected a batch or a list of images, got {type(images).__name__}"
        ) from None


def colour_channels(images: Any) -> tuple[Any, torch.Tensor | None]:
    """(colour, extra): the [B, 3, H, W] colour of a batch with more channels (LDM3D hands its
    checker colour plus depth) and those other channels; extra is None for colour input."""
    if torch.is_tensor(images) and images.ndim == 4 and images.shape[1] > 3:
        return images[:, :3], images[:, 3:]
    return images, None


def with_extra(colour: Any, extra: torch.Tensor | None, flagged: list[int]) -> Any:
    """The colour (acted on) and the other channels back in one batch, the others as the pipeline
    returns them: it does not denormalise a flagged image, so they are denormalised here."""
    if extra is None:
        return colour
    if flagged and extra.is_floating_point():
        extra = extra.clone()
        rows = torch.tensor(flagged, device=extra.device)
        extra[rows] = (extra[rows] * 0.5 + 0.5).clamp(0, 1)
    return torch.cat([torch.stack(list(colour)) if isinstance(colour, list) else colour, extra], 1)


def _kind(item: Any) -> str:
    if torch.is_tensor(item):
        return "tensor"
    if isinstance(item, np.ndarray):
        return "numpy"
    if isinstance(item, Image.Image):
        return "pil"
    raise ImageInputError(f"images: unsupported image type {type(item).__name__}")


def as_shown(images: Any) -> tuple[Any, str]:
    """`images` as the pipeline will show them, and their value range.

    diffusers hands over VAE tensors in [-1, 1] (the pipeline denormalises and clamps them after
    the checker; the VAE overshoots) or, in older pipelines, numpy arrays in [0, 1]: clamped here
    the same way, so the engine judges, hashes and holds what is shown.
    """
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    kinds = {_kind(x) for x in items}
    if len(kinds) > 1:
        raise ImageInputError(f"images: a list mixes {' and '.join(sorted(kinds))} images")
    kind = kinds.pop() if kinds else "tensor"
    if kind == "tensor":
        shown = [x.clamp(-1, 1) if x.is_floating_point() else x for x in items]
        value_range = "-1,1"
    elif kind == "numpy":
        shown = [np.clip(x, 0, 1) if x.dtype.kind == "f" else x for x in items]
        value_range = "0,1"
    else:
        shown, value_range = items, "0,1"
    return (shown if isinstance(images, (list, tuple)) else shown[0]), value_range


def act_in_place(images, indices: list[int], actions: list[str], policy: CompiledPolicy):
    """Write each flagged image's action into `images` (diffusers' zeros for a blackout).

    Tensors (batch or list) hold VAE output in [-1, 1] and the pipeline does not denormalise a
    flagged image, so acted tensors are written in [0, 1]; numpy images are [0, 1], channels last.
    Returns the images (a tuple comes back as a list).
    """
    if isinstance(images, tuple):
        images = list(images)
    others = []
    for i, action in zip(indices, actions, strict=True):
        if action == "blackout":
            images[i] = _black_like(images[i])  # exactly what diffusers writes
        else:
            others.append((i, action))
    if not others:
        return images
    rows = [i for i, _ in others]
    acted = apply_actions(
        [_unit(images[i]) for i in rows],
        [a for _, a in others],
        **policy_settings(policy),
    )  # N x [3, H, W] in [0, 1]
    for i, image in zip(rows, acted, strict=True):
        images[i] = _like_item(image, images[i])
    return images


def blackout_in_place(images, indices: list[int]):
    """Black images at `indices`; if even that fails, nothing is returned at all."""
    try:
        if isinstance(images, tuple):
            images = list(images)
        for i in indices:
            images[i] = _black_like(images[i])
        return images
    except Exception as exc:
        raise ModerationError(f"moderation could not black out flagged images: {exc}") from exc


def _black_like(item: Any) -> Any:
    if torch.is_tensor(item):
        return torch.zeros_like(item)
    if isinstance(item, Image.Image):
        return Image.new("RGB", item.size)
    return np.zeros(np.shape(item), dtype=getattr(item, "dtype", np.float32))


def _unit(item: Any) -> torch.Tensor:
    """One image as a [3, H, W] float32 tensor in [0, 1], on its own device."""
    if torch.is_tensor(item):
        if item.is_floating_point():
            return (item.float() * 0.5 + 0.5).clamp(0, 1)  # the pipeline's denormalise
        return item.float() / 255
    array = np.asarray(item.convert("RGB") if isinstance(item, Image.Image) else item)
    hwc = torch.from_numpy(np.array(array, dtype=np.float32))  # a writable float32 copy
    if array.dtype == np.uint8:
        hwc = hwc / 255
    return hwc.permute(2, 0, 1)


def _like_item(acted: torch.Tensor, item: Any) -> Any:
    """An acted [3, H, W] [0, 1] image back in the form of `item` (tensors stay in [0, 1])."""
    if torch.is_tensor(item):
        if item.is_floating_point():
            return acted.to(item.dtype)
        return (acted * 255).round().to(item.dtype)
    hwc = acted.permute(1, 2, 0).cpu().numpy()
    if isinstance(item, Image.Image):
        return Image.fromarray((hwc * 255).round().astype(np.uint8))
    if item.dtype == np.uint8:
        return (hwc * 255).round().astype(np.uint8)
    return hwc.astype(item.dtype)
