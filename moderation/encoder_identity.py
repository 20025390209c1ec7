"""What identifies an image encoder, and the preprocessing it may use.

`preprocessing_settings` checks a preprocessor config against sane bounds wherever a model is
loaded (a CLIP checkpoint, a safety checker, a saved checker folder); `tower_digest` names the
vision tower and preprocessing that embedded an image, logged with every decision
(docs/threat-model.md, "Artifact integrity").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch
from torch import nn

from moderation.errors import EncoderError
from moderation.preprocess import CLIP_MEAN, CLIP_STD

# Sane preprocessing (preprocessor_config.json): anything else is refused, not used. A std of
# 1e6 makes every image the same input; a mean outside [0, 1] or a std far from CLIP's ~0.27
# (SigLIP's 0.5) is not a normalisation of [0, 1] pixels. The engine resizes with bicubic +
# antialias and rescales by 1/255 itself, so a config asking for other steps is refused too.
IMAGE_STD_RANGE = (0.05, 1.0)
IMAGE_MEAN_RANGE = (0.0, 1.0)
IMAGE_SIZE_RANGE = (32, 1024)
PIL_RESAMPLE = range(6)  # NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING


def preprocessing_settings(data: dict, tower_size: int, where: str) -> tuple[int, tuple, tuple]:
    """(crop size, mean, std) of a preprocessor config, checked to be what the engine does."""

    def bad(key: str, why: str) -> EncoderError:
        return EncoderError(f"{where}: {key} {why}; refusing to judge images with it")

    size = data.get("crop_size") or data.get("size") or tower_size
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or tower_size
    low, high = IMAGE_SIZE_RANGE
    if isinstance(size, bool) or not isinstance(size, int) or not low <= size <= high:
        raise bad(
            "crop_size", f"must be a whole number of pixels from {low} to {high}, not {size!r}"
        )
    if size != tower_size:
        raise bad("crop_size", f"{size} is not the vision tower's image size ({tower_size})")
    settings = []
    for key, default, (low, high) in (
        ("image_mean", CLIP_MEAN, IMAGE_MEAN_RANGE),
        ("image_std", CLIP_STD, IMAGE_STD_RANGE),
    ):
        values = data.get(key, default)
        if (
            not isinstance(values, (list, tuple))
            or len(values) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            or not all(low <= float(v) <= high for v in values)
        ):
            raise bad(key, f"must be 3 numbers from {low} to {high}, not {values!r}")
        settings.append(tuple(float(v) for v in values))
    resample = data.get("resample", 3)
    if isinstance(resample, bool) or resample not in PIL_RESAMPLE:
        raise bad("resample", f"must be a PIL filter number (0 to 5), not {resample!r}")
    for key in ("do_normalize", "do_rescale"):
        if data.get(key, True) is not True:
            raise bad(key, "must be true (the engine rescales and normalises every image)")
    factor = data.get("rescale_factor", 1 / 255)
    if not isinstance(factor, (int, float)) or abs(float(factor) - 1 / 255) > 1e-9:
        raise bad("rescale_factor", f"must be 1/255, not {factor!r}")
    return size, settings[0], settings[1]


def tower_digest(
    vision_model: nn.Module, projection: nn.Module, size: int, mean: Sequence, std: Sequence
) -> str:
    """sha256 identifying an image encoder: its vision tower's and projection's tensors (as
    float32, by name, whatever the transformers version's nesting), and its preprocessing.

    The same tower gives the same digest whether it was loaded from a CLIP checkpoint, a
    safety checker or a saved checker folder, on any device and in any dtype it runs in.
    """
    h = hashlib.sha256(b"moderation-encoder-1\n")
    tensors = {}
    for prefix, module in (("vision.", vision_model), ("projection.", projection)):
        for name, tensor in module.state_dict().items():
            while name.startswith("vision_model."):  # transformers 4 nests one more level
                name = name[len("vision_model.") :]
            tensors[prefix + name] = tensor
    for name in sorted(tensors):
        if name.endswith("position_ids"):  # a constant buffer some versions save, others not
            continue
        values = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}\0{list(values.shape)}\n".encode())
        h.update(values.numpy())  # the buffer itself: no copy of the weights
    settings = {"size": int(size), "mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()
