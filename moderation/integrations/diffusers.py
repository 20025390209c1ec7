"""PolicySafetyChecker: a policy in the `safety_checker` slot of a diffusers pipeline.

Called like `StableDiffusionSafetyChecker` (`checker(images=..., clip_input=...)` returns
`(images, has_nsfw_concepts)`), but every image gets a `Decision` (kept in `last_decisions`) and
the policy's action: black, blurred, pixelated or a review placeholder instead of always black.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moderation.actions import apply_actions
from moderation.decision import Decision, decide
from moderation.scoring import score
from policy.compiled import CompiledPolicy

logger = logging.getLogger(__name__)


class VisionTower(nn.Module):
    """A CLIP vision tower and its projection (shared, not copied) as an `nn.Module` encoder."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    @torch.no_grad()
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] CLIP-normalised pixels -> [B, D] embeddings, exactly as diffusers."""
        weight = self.visual_projection.weight
        pooled = self.vision_model(pixel_values.to(weight.device, weight.dtype))[1]  # [B, hidden]
        return self.visual_projection(pooled)  # [B, D]


class PolicySafetyChecker(nn.Module):
    """A drop-in `safety_checker`: same call and return as diffusers', decisions from a policy."""

    main_input_name = "clip_input"

    def __init__(self, compiled_policy: CompiledPolicy, encoder) -> None:
        """encoder: an `nn.Module` with `encode_image`, or anything holding `vision_model` and
        `visual_projection` (a `ClipEncoder`, diffusers' own checker), whose modules are shared."""
        super().__init__()
        if not (isinstance(encoder, nn.Module) and hasattr(encoder, "encode_image")):
            encoder = VisionTower(encoder.vision_model, encoder.visual_projection)
        self.encoder = encoder
        self.policy = compiled_policy.to(_module_device(encoder, compiled_policy.device))
        self.last_decisions: list[Decision] = []

    @classmethod
    def from_policy(
        cls,
        path: str | Path,
        model: str | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> PolicySafetyChecker:
        """Load a policy YAML (compiled with model or its own `model:`) or a compiled artifact."""
        from moderation.engine import load_compiled

        compiled, encoder = load_compiled(path, model=model, device=device, dtype=dtype)
        return cls(compiled, encoder)

    @classmethod
    def from_checker(
        cls, checker: nn.Module, policy: CompiledPolicy | None = None
    ) -> PolicySafetyChecker:
        """Wrap a loaded `StableDiffusionSafetyChecker`: its own concepts unless a policy is given.

        The vision tower is shared, not copied, so `pipe.safety_checker = from_checker(
        pipe.safety_checker)` costs no memory and flags what diffusers flags.
        """
        from moderation.integrations.sd_checker import CheckerTensors, checker_policy

        if policy is None:
            tensors = CheckerTensors(
                checker.concept_embeds.detach().float(),
                checker.concept_embeds_weights.detach().float(),
                checker.special_care_embeds.detach().float(),
                checker.special_care_embeds_weights.detach().float(),
                source=type(checker).__name__,
            )
            model = getattr(checker.config, "_name_or_path", "") or "safety_checker"
            policy = checker_policy(tensors, name="sd-safety-checker", model=model)
        return cls(policy, checker)

    @property
    def device(self) -> torch.device:
        """The encoder's device (diffusers' pipeline reads it from every component)."""
        return _module_device(self.encoder, self.policy.device)

    @property
    def dtype(self) -> torch.dtype:
        """The encoder's dtype (diffusers' `pipe.dtype` may read it from this component)."""
        param = next(self.encoder.parameters(), None)
        return param.dtype if param is not None else torch.float32

    def _apply(self, fn, recurse=True):
        """Follow `.to()`/`.cuda()`: the policy is a dataclass, not parameters; it stays float32."""
        super()._apply(fn, recurse)
        moved = fn(torch.empty(0, device=self.policy.device))
        self.policy = self.policy.to(moved.device)
        return self

    @torch.no_grad()
    def forward(self, clip_input: torch.Tensor, images):
        """Moderate a batch; flagged images are changed in place; returns (images, flags)."""
        embeddings = self.encoder.encode_image(clip_input)  # [B, D]
        decisions = decide(self.policy, score(self.policy, embeddings), embeddings=embeddings)
        self.last_decisions = decisions
        has_nsfw_concepts = [d.action != "allow" for d in decisions]
        flagged = [i for i, hit in enumerate(has_nsfw_concepts) if hit]
        if flagged:
            _act_in_place(images, flagged, [decisions[i].action for i in flagged], self.policy)
            # One line per batch, like diffusers, but saying what happened to which image and why.
            reasons = "; ".join(
                f"{i}: {decisions[i].action} ({_reason(decisions[i])})" for i in flagged
            )
            logger.warning(
                "moderation: %d of %d images changed by policy %s: %s",
                len(flagged),
                len(decisions),
                self.policy.name,
                reasons,
            )
        return images, has_nsfw_concepts


def _reason(decision: Decision) -> str:
    """Why an image was changed, in a few words."""
    if decision.error:
        return decision.error
    if decision.fired:
        return ", ".join(decision.fired[:5]) + (", ..." if len(decision.fired) > 5 else "")
    return "special care" if decision.special_hits else "review band"


def _module_device(module: nn.Module, default: torch.device) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else default


def _act_in_place(images, indices: list[int], actions: list[str], policy: CompiledPolicy) -> None:
    """Write each flagged image's action into `images` (diffusers' zeros for a blackout).

    Tensors (batch or list) hold VAE output in [-1, 1] and the pipeline does not denormalise a
    flagged image, so acted tensors are written in [0, 1]; numpy images are [0, 1], channels last.
    """
    is_tensor = torch.is_tensor(images) or torch.is_tensor(images[0])
    others = []
    for i, action in zip(indices, actions, strict=True):
        if action == "blackout":
            # Exactly what diffusers writes, so imported checkers give identical images.
            if is_tensor:
                images[i] = torch.zeros_like(images[i])
            else:
                images[i] = np.zeros(images[i].shape)
        else:
            others.append((i, action))
    if not others:
        return
    rows = [i for i, _ in others]
    if is_tensor:
        batch = torch.stack([images[i] for i in rows]).float()  # [N, 3, H, W] in [-1, 1]
        unit = (batch * 0.5 + 0.5).clamp(0, 1)  # the pipeline's denormalise
    else:
        batch_np = np.stack([np.asarray(images[i]) for i in rows])  # [N, H, W, 3] in [0, 1]
        unit = torch.from_numpy(batch_np).float().permute(0, 3, 1, 2)
    acted = apply_actions(
        unit,
        [a for _, a in others],
        blur_radius=policy.blur_radius,
        pixelate_block=policy.pixelate_block,
        review_placeholder=policy.review_placeholder,
    )  # [N, 3, H, W] in [0, 1]
    for k, i in enumerate(rows):
        if is_tensor:
            images[i] = acted[k].to(images[i].dtype)
        else:
            images[i] = acted[k].permute(1, 2, 0).numpy().astype(np.asarray(images[i]).dtype)
