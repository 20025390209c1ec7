"""Encoders of the diffusers slot: a CLIP vision tower as an `nn.Module`, and a module as the
`Moderator`'s encoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moderation.encoder_identity import tower_digest
from moderation.images import CLIP_MEAN, CLIP_STD
from policy.compiled import CompiledPolicy


class VisionTower(nn.Module):
    """A CLIP vision tower and its projection (shared, not copied) as an `nn.Module` encoder."""

    def __init__(
        self,
        vision_model: nn.Module,
        visual_projection: nn.Module,
        *,
        image_size: int | None = None,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        digest: str | None = None,
    ) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        config = getattr(vision_model, "config", None)
        self.image_size = int(image_size or getattr(config, "image_size", 224))
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        # moderation.encoder_identity.tower_digest of the weights as first given (a later
        # .half() does not change what the tower is)
        self.digest = digest or tower_digest(
            vision_model, visual_projection, self.image_size, self.image_mean, self.image_std
        )

    @classmethod
    def of(cls, encoder: Any) -> VisionTower:
        """The tower of a `ClipEncoder` or of diffusers' own checker, with its image settings."""
        return cls(
            encoder.vision_model,
            encoder.visual_projection,
            image_size=getattr(encoder, "image_size", None),
            image_mean=getattr(encoder, "image_mean", CLIP_MEAN),
            image_std=getattr(encoder, "image_std", CLIP_STD),
            digest=getattr(encoder, "digest", None),
        )

    @torch.no_grad()
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] CLIP-normalised pixels -> [B, D] embeddings, exactly as diffusers."""
        weight = self.visual_projection.weight
        pooled = self.vision_model(pixel_values.to(weight.device, weight.dtype))[1]  # [B, hidden]
        return self.visual_projection(pooled)  # [B, D]


class ModuleEncoder:
    """The checker's encoder module as the Moderator's encoder. Its device is read from the module
    on every call, so a pipeline's `.to()` moves what the Moderator encodes with."""

    def __init__(self, module: nn.Module, policy: CompiledPolicy) -> None:
        self.module = module
        self.model_id = policy.model
        self._default_device = policy.device  # for an encoder without parameters
        projection = getattr(module, "visual_projection", None)
        weight = getattr(projection, "weight", None)
        self.embed_dim = int(weight.shape[0]) if weight is not None else policy.embed_dim
        self.image_size = int(getattr(module, "image_size", 224))
        self.image_mean = tuple(getattr(module, "image_mean", CLIP_MEAN))
        self.image_std = tuple(getattr(module, "image_std", CLIP_STD))
        self.digest = getattr(module, "digest", None)
        if self.digest is None and projection is not None and hasattr(module, "vision_model"):
            self.digest = tower_digest(
                module.vision_model, projection, self.image_size, self.image_mean, self.image_std
            )

    @property
    def device(self) -> torch.device:
        return module_device(self.module, self._default_device)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.module.encode_image(pixel_values)


def module_device(module: nn.Module, default: torch.device) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else default
