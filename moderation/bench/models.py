"""The models `moderation bench` compares: diffusers' safety checker and our Moderator, same weights.

By default both come from one random checker with ViT-L/14 widths built in-process (no download):
diffusers' `StableDiffusionSafetyChecker` object is timed as its pipeline runs it, and our
`ClipEncoder` loads the very same weights from a temporary save of it.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moderation.errors import ModerationError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ATTENTION = ("sdpa", "eager")


class BenchError(ModerationError):
    """The benchmark cannot run as configured (device, dtype, model, database)."""


@dataclass
class BenchModels:
    """Everything the forward and end-to-end rows need, on one device in one dtype."""

    checker: nn.Module  # diffusers' StableDiffusionSafetyChecker, loaded as its pipeline loads it
    feature_extractor: Any  # the CLIPImageProcessor its pipeline runs
    encoder: Any  # our ClipEncoder over the same weights
    policy: Any  # CompiledPolicy of the checker's concepts, compat diffusers
    model_id: str
    description: str  # where the weights came from, for the report
    attention: str  # our tower's attention implementation
    compiled: bool


def resolve_device(device: str | None) -> torch.device:
    """The requested torch device (default cuda when available), checked as the encoder checks it."""
    from moderation.encoder import check_device
    from moderation.errors import EncoderError

    try:
        return check_device(device)
    except EncoderError as exc:
        raise BenchError(f"--{exc}") from None  # "--device X: why", as the option is named


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """float16 on a GPU and float32 on a CPU unless asked otherwise."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise BenchError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _attention_configs(module: nn.Module) -> list[Any]:
    """The configs the attention layers of a CLIP tower read their implementation from."""
    configs = {
        id(m.config): m.config
        for m in module.modules()
        if type(m).__name__.endswith("Attention") and getattr(m, "config", None) is not None
    }
    return list(configs.values())


def set_attention(module: nn.Module, implementation: str) -> None:
    """Switch a CLIP tower between SDPA and eager attention (read by each layer at call time)."""
    if implementation not in ATTENTION:
        raise BenchError(f"attention {implementation!r}: expected one of {', '.join(ATTENTION)}")
    for config in _attention_configs(module):
        config._attn_implementation = implementation


@contextlib.contextmanager
def attention(module: nn.Module, implementation: str) -> Iterator[None]:
    """Run a tower with another attention implementation for a while."""
    before = attention_of(module)
    set_attention(module, implementation)
    try:
        yield
    finally:
        if before in ATTENTION:
            set_attention(module, before)


def attention_of(module: nn.Module) -> str:
    """The attention implementation the tower's layers use ("sdpa", "eager", ...)."""
    found = {str(c._attn_implementation) for c in _attention_configs(module)}
    return ",".join(sorted(found)) or "unknown"


def load_models(
    *,
    model: str | None,
    size: str,
    device: torch.device,
    dtype: torch.dtype,
    attention: str = "sdpa",
    compile: bool = False,
    seed: int = 0,
) -> BenchModels:
    """diffusers' checker and our encoder + policy over the same weights, on device in dtype."""
    with _quiet_transformers():
        return _load_models(model, size, device, dtype, attention, compile, seed)


def _load_models(
    model: str | None,
    size: str,
    device: torch.device,
    dtype: torch.dtype,
    attention: str,
    compile: bool,
    seed: int,
) -> BenchModels:
    from moderation.encoder import ClipEncoder

    if model is None:
        from moderation.synthetic import build_safety_checker

        with tempfile.TemporaryDirectory(prefix="moderation-bench-") as folder:
            build_safety_checker(size=size, seed=seed).save_pretrained(folder)
            # Both load the saved weights: diffusers' checker as its pipeline loads it.
            checker, _ = _load_checker(folder)
            encoder = ClipEncoder.from_pretrained(folder, device=device, dtype=dtype)
        model_id = f"random-{size}"
        widths = checker.config.vision_config
        description = (
            f"random weights, {'ViT-L/14' if size == 'vit-l' else 'tiny'} widths "
            f"(hidden {widths.hidden_size}, {widths.num_hidden_layers} layers, patch "
            f"{widths.patch_size}, projection {checker.config.projection_dim}), seed {seed}"
        )
        feature_extractor = _default_feature_extractor()
    else:
        checker, feature_extractor = _load_checker(model)
        encoder = ClipEncoder.from_pretrained(model, device=device, dtype=dtype)
        model_id, description = str(model), f"checkpoint {model}"
    checker = checker.to(device=device, dtype=dtype).eval()
    set_attention(encoder.vision_model, attention)
    if compile:
        # Compiled once per batch size during warm-up; dynamic=False keeps each shape's best kernels.
        encoder.vision_model = torch.compile(encoder.vision_model, dynamic=False)
    policy = policy_from_checker(checker, model_id)
    return BenchModels(
        checker=checker,
        feature_extractor=feature_extractor,
        encoder=encoder,
        policy=policy,
        model_id=model_id,
        description=description,
        attention=attention,
        compiled=compile,
    )


def _default_feature_extractor():
    """The feature extractor Stable Diffusion pipelines ship (CLIP's 224 preprocessing)."""
    with _quiet_transformers():  # "falls back to the PIL backend" notice
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or notices from transformers while the bench builds its models."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def _load_checker(model: str) -> tuple[nn.Module, Any]:
    """diffusers' checker for a checker checkpoint, or one built around a CLIP's vision tower."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    from moderation.checkpoint import Checkpoint
    from moderation.errors import EncoderError

    try:
        checkpoint = Checkpoint.resolve(model)  # the same lookup the encoder makes
    except EncoderError as exc:
        raise BenchError(f"--model: {exc}") from None
    folder = checkpoint.folder if checkpoint.local else None
    source, architectures = checkpoint.source, checkpoint.config.get("architectures") or []
    if "StableDiffusionSafetyChecker" in architectures:
        # No attention argument: the implementation diffusers and transformers pick for a pipeline.
        checker = StableDiffusionSafetyChecker.from_pretrained(source)
    elif "CLIPModel" in architectures:
        from transformers import CLIPConfig, CLIPModel

        clip = CLIPModel.from_pretrained(source)
        torch.manual_seed(0)
        # A fresh config, as from_pretrained would read it (the loaded one says "sdpa", which
        # the checker class refuses); random concepts around CLIP's vision weights.
        checker = StableDiffusionSafetyChecker(CLIPConfig.from_dict(clip.config.to_dict()))
        checker.vision_model.load_state_dict(clip.vision_model.state_dict())
        checker.visual_projection.load_state_dict(clip.visual_projection.state_dict())
        _random_concepts(checker)
    else:
        raise BenchError(
            f"--model {model}: {', '.join(architectures) or 'no architectures'} is neither a "
            "StableDiffusionSafetyChecker nor a CLIPModel checkpoint"
        )
    extractor_dirs = [folder, folder.parent / "feature_extractor"] if folder is not None else []
    for candidate in extractor_dirs:
        if (candidate / "preprocessor_config.json").is_file():
            return checker.eval(), CLIPImageProcessor.from_pretrained(candidate)
    return checker.eval(), _default_feature_extractor()


def _random_concepts(checker: nn.Module, n_concepts: int = 17, n_special: int = 3) -> None:
    dim = checker.visual_projection.weight.shape[0]
    checker.concept_embeds = nn.Parameter(torch.randn(n_concepts, dim), requires_grad=False)
    checker.special_care_embeds = nn.Parameter(torch.randn(n_special, dim), requires_grad=False)
    checker.concept_embeds_weights = nn.Parameter(
        0.05 * torch.randn(n_concepts), requires_grad=False
    )
    checker.special_care_embeds_weights = nn.Parameter(
        0.05 * torch.randn(n_special), requires_grad=False
    )


def sparse_thresholds(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """[n] thresholds at which ~1% of random images fire each concept, as in real traffic.

    The cosine of two random directions in `dim` dimensions has a standard deviation of
    1/sqrt(dim) (0.036 for ViT-L's 768); 2.5 of those, +-0.3, leaves ~0.6% above threshold.
    """
    return (2.5 + 0.3 * torch.randn(n, generator=generator)) / dim**0.5


def policy_from_checker(checker: nn.Module, model_id: str, *, name: str = "bench"):
    """A CompiledPolicy with the checker's concepts and thresholds and diffusers' semantics."""
    return concept_policy(
        checker.concept_embeds.detach(),
        checker.concept_embeds_weights.detach(),
        checker.special_care_embeds.detach(),
        checker.special_care_embeds_weights.detach(),
        model_id=model_id,
        name=name,
    )


def concept_policy(
    concepts: torch.Tensor,  # [C, D]
    thresholds: torch.Tensor,  # [C]
    special: torch.Tensor,  # [S, D]
    special_thresholds: torch.Tensor,  # [S]
    *,
    model_id: str,
    name: str = "bench",
):
    """`compat: diffusers` policy (blackout on any hit, +0.01 after a special-care hit)."""
    from moderation.integrations.sd_checker import CheckerTensors, checker_policy

    tensors = CheckerTensors(
        concept_embeds=concepts.float().cpu(),
        concept_thresholds=thresholds.float().cpu(),
        special_embeds=special.float().cpu(),
        special_thresholds=special_thresholds.float().cpu(),
        source="(in memory)",
    )
    return checker_policy(tensors, name=name, model=model_id)


class _PooledIdentity(nn.Module):
    """Stands in for the vision tower: returns the given embeddings as its pooled output."""

    def forward(self, embeddings: torch.Tensor):
        return (None, embeddings)


def loops_checker(
    concepts: torch.Tensor,  # [N, D]
    thresholds: torch.Tensor,  # [N]
    special: torch.Tensor,  # [S, D]
    special_thresholds: torch.Tensor,  # [S]
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> nn.Module:
    """diffusers' checker with N concept rows and no tower: its forward then runs only the work
    after `image_embeds` (cosines, host copy, per-image per-concept loops, blackout)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from moderation.synthetic import clip_config

    config = clip_config(projection_dim=concepts.shape[1])
    config._attn_implementation = "eager"
    checker = StableDiffusionSafetyChecker(config).eval()
    checker.vision_model = _PooledIdentity()
    checker.visual_projection = nn.Identity()
    checker.concept_embeds = nn.Parameter(concepts.clone(), requires_grad=False)
    checker.concept_embeds_weights = nn.Parameter(thresholds.clone(), requires_grad=False)
    checker.special_care_embeds = nn.Parameter(special.clone(), requires_grad=False)
    checker.special_care_embeds_weights = nn.Parameter(
        special_thresholds.clone(), requires_grad=False
    )
    return checker.to(device=device, dtype=dtype)
