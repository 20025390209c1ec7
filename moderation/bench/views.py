"""Section e of `moderation bench`: what full coverage costs against CLIP's centre crop.

For common aspect ratios of generated images (1:1, 2:3, 9:16), the same decoded batch is
moderated under `views: center`, `cover` (the default) and `tiles`: views per image and ms per
image, end to end through `Moderator.moderate`, on the bench's device and weights.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from moderation.bench.config import measure_interleaved

if TYPE_CHECKING:
    from moderation.bench.config import BenchConfig
    from moderation.bench.models import BenchModels

# (name, height, width): Stable Diffusion's 512 x 512 and the portrait sizes people ask for.
ASPECTS = (("1:1", 512, 512), ("2:3", 768, 512), ("9:16", 1024, 576))


def run_views(
    models: BenchModels,
    config: BenchConfig,
    device: torch.device,
    dtype: torch.dtype,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """One row per aspect ratio: views per image and ms per image of each timed view mode."""
    from moderation.engine import Moderator
    from moderation.preprocess import plan_views

    # The bench's policy reproduces diffusers (compat, so centre crop only): the same concepts
    # with our own semantics, once per view mode.
    base = dataclasses.replace(models.policy, compat=None, views=None, digest="")
    moderators = {
        mode: Moderator(dataclasses.replace(base, views=mode, digest=""), models.encoder)
        for mode in config.view_modes
    }
    generator = torch.Generator().manual_seed(config.seed + 2)
    batch, size = config.views_batch, models.encoder.image_size
    rows = []
    for name, height, width in ASPECTS:
        views = {m: len(plan_views(height, width, m, size)) for m in ("center", "cover", "tiles")}
        say(f"views, {name} ({height}x{width}), batch {batch}: {', '.join(config.view_modes)}")
        shape = (batch, 3, height, width)
        images = (torch.rand(shape, generator=generator) * 2 - 1).to(device, dtype)  # [-1,1]
        calls = {
            mode: (functools.partial(_moderate, moderator), images.clone)
            for mode, moderator in moderators.items()
        }
        timings, _ = measure_interleaved(
            calls,
            device=device,
            repeats=config.e2e_repeats or config.repeats,
            warmup=config.warmup,
        )
        per_image = {mode: t.median_ms / batch for mode, t in timings.items()}
        centre = per_image.get("center")
        rows.append(
            {
                "aspect": name,
                "height": height,
                "width": width,
                "batch": batch,
                "views_per_image": views,
                "ms_per_image": per_image,
                "x_center": {m: (ms / centre if centre else None) for m, ms in per_image.items()},
                "timing": {mode: t.to_dict() for mode, t in timings.items()},
            }
        )
    return rows


def _moderate(moderator: Any, images: torch.Tensor) -> list[bool]:
    return moderator.moderate(images, value_range="-1,1").flagged
