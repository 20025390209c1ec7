"""What a wrapped pipeline is asked for, and its decoded output converted to the caller's type.

`moderate_pipeline` runs a pipeline with `output_type="pt"`: the decoded tensor, on the
pipeline's device, before any host copy. Most pipelines return it in [0, 1] (their image or
video processor denormalised it); DeepFloyd IF returns its raw [-1, 1] samples. The conversion
to `np` and `pil` afterwards is the pipeline's own (`pt_to_numpy`, `numpy_to_pil` of its image
or video processor; IF's own denormalise, `numpy_to_pil` and watermarker), so that a policy
that allows everything gives back exactly what the bare pipeline gives.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moderation.errors import ModerationError

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Pipelines whose output is not one image batch or one video batch: the slot moderates them.
SLOT_ONLY = {
    "StableDiffusionLDM3DPipeline": "returns colour and depth (rgb, depth) and has no 'pt' output",
}


@dataclass(frozen=True)
class OutputForm:
    """How one pipeline's decoded output looks when asked for `output_type="pt"`."""

    field: str  # the output's attribute holding it: "images" or "frames"
    video: bool  # [B, F, 3, H, W] rather than [B, 3, H, W]
    value_range: str  # "0,1" or "-1,1" (DeepFloyd IF)


def caller_output_type(pipe: Any, kwargs: dict[str, Any]) -> str:
    """The output_type the caller asked for, or the pipeline's own default ("pil" for most,
    "np" for some video pipelines); diffusers reads any other value as "np"."""
    requested = kwargs.get("output_type")
    if requested is None:
        parameter = inspect.signature(type(pipe).__call__).parameters.get("output_type")
        default = parameter.default if parameter is not None else "pil"
        requested = default if isinstance(default, str) else "pil"
    return requested if requested in OUTPUT_TYPES else "np"


def check_supported(pipe: Any) -> None:
    """Refuse, before anything runs, a pipeline moderate_pipeline cannot judge as a whole."""
    name = type(pipe).__name__
    if name in SLOT_ONLY:
        raise ModerationError(
            f"{name} {SLOT_ONLY[name]}: moderate it in its safety_checker slot "
            "(PolicySafetyChecker), which judges and acts on the colour channels"
        )


def form_of(pipe: Any, output: Any) -> OutputForm:
    """Where the decoded tensor is in a pipeline's output, and its layout and range."""
    for field in ("images", "frames"):
        value = getattr(output, field, None)
        if value is None:
            continue
        if not torch.is_tensor(value):
            raise ModerationError(
                f"{type(pipe).__name__} returned {type(value).__name__} {field} for "
                "output_type='pt': nothing was shown, and it cannot be judged"
            )
        if value.ndim not in (4, 5) or value.shape[-3] != 3:
            raise ModerationError(
                f"{type(pipe).__name__}: expected {field} of shape [B, 3, H, W] or "
                f"[B, F, 3, H, W], got {list(value.shape)}"
            )
        return OutputForm(field, value.ndim == 5, "-1,1" if _is_deepfloyd(pipe) else "0,1")
    raise ModerationError(f"{type(pipe).__name__}: its output has neither images nor frames")


def _is_deepfloyd(pipe: Any) -> bool:
    return type(pipe).__module__.startswith("diffusers.pipelines.deepfloyd_if")


def convert(pipe: Any, form: OutputForm, decoded: torch.Tensor, output_type: str) -> Any:
    """The moderated decoded tensor as the bare pipeline returns `output_type`."""
    if output_type == "pt":
        return decoded
    if _is_deepfloyd(pipe):  # IF's own post-processing (pipeline_if.py, steps 8-11)
        array = (decoded / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "np":
            return array
        images = pipe.numpy_to_pil(array)
        if getattr(pipe, "watermarker", None) is not None:
            images = pipe.watermarker.apply_watermark(images, pipe.unet.config.sample_size)
        return images
    processor = _processor(pipe)
    if form.video:  # the video processor's postprocess_video, one video at a time
        arrays = [processor.pt_to_numpy(video) for video in decoded]  # each [F, H, W, 3]
        if output_type == "np":
            return np.stack(arrays)
        return [processor.numpy_to_pil(frames) for frames in arrays]
    array = processor.pt_to_numpy(decoded)
    if output_type == "np":
        return array
    images = processor.numpy_to_pil(array)
    if getattr(pipe, "watermarker", None) is not None:  # the SD upscaler, "pil" only
        images = pipe.watermarker.apply_watermark(images)
    return images


def _processor(pipe: Any) -> Any:
    for name in ("video_processor", "image_processor"):
        processor = getattr(pipe, name, None)
        if processor is not None and hasattr(processor, "pt_to_numpy"):
            return processor
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor
