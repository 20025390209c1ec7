"""A policy in the three-value checker slot of DeepFloyd IF and the Stable Diffusion upscaler.

`IFPipeline` (and its super-resolution, img2img and inpainting variants) and
`StableDiffusionUpscalePipeline` unpack `images, nsfw_detected, watermark_detected` from their
checker. `ThreeValueSafetyChecker` is `PolicySafetyChecker` (same constructors, logging, review,
shadow candidates and fail-closed behaviour) returning those three values: the policy decides
`nsfw_detected`; `watermark_detected` is None (the policy language has no watermark concept).
"""

from __future__ import annotations

from typing import Any

import torch

# diffusers saves and loads a pipeline component whose class derives from one of its known bases,
# and looks that base up by name in the component's own module: keep `ModelMixin` imported here.
from diffusers import ModelMixin  # noqa: F401

from moderation.integrations.diffusers import PolicySafetyChecker


class ThreeValueSafetyChecker(PolicySafetyChecker):
    """A drop-in `safety_checker` for DeepFloyd IF and the SD upscaler: (images, nsfw, None)."""

    # IF's slot is typed IFSafetyChecker; the upscaler's `Any` (typing.Any is a class).
    stands_in_for = (
        ("diffusers.pipelines.deepfloyd_if.safety_checker", "IFSafetyChecker"),
        ("typing", "Any"),
    )

    @torch.no_grad()
    def forward(self, clip_input: torch.Tensor | None = None, images: Any = None):
        """Moderate a batch; returns (images, nsfw_detected, watermark_detected=None)."""
        images, nsfw_detected = super().forward(clip_input=clip_input, images=images)
        return images, nsfw_detected, None
