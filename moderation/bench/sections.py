"""Sections a-c of `moderation bench`: the vision forward, end to end, and the work after it."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moderation.bench.config import count_host_syncs, measure, measure_interleaved

if TYPE_CHECKING:
    from moderation.bench.config import BenchConfig
    from moderation.bench.models import BenchModels

# Decoded image size of Stable Diffusion 1.x, as its VAE emits it.
DECODED_SIZE = 512


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence the checker's per-call "Potential NSFW content" warning while timing it."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


def run_end_to_end(
    models: BenchModels,
    config: BenchConfig,
    device: torch.device,
    dtype: torch.dtype,
    say: Callable[[str], None],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of sections a (bare forward) and b (end to end), one per batch size."""
    from diffusers.image_processor import VaeImageProcessor

    from moderation.bench.models import attention
    from moderation.engine import Moderator

    encoder, checker = models.encoder, models.checker
    moderator = Moderator(models.policy, encoder)  # logging off for these rows
    vae_processor = VaeImageProcessor(vae_scale_factor=8)
    generator = torch.Generator().manual_seed(config.seed)
    repeats = config.e2e_repeats or config.repeats

    def decoded(batch: int) -> torch.Tensor:  # [B,3,512,512] in [-1,1], pipeline dtype
        shape = (batch, 3, DECODED_SIZE, DECODED_SIZE)
        return (torch.rand(shape, generator=generator) * 2 - 1).to(device, dtype)

    def floor(pixels: torch.Tensor) -> torch.Tensor:
        return encoder.visual_projection(encoder.vision_model(pixels)[1])  # [B, D]

    def eager_floor(pixels: torch.Tensor) -> torch.Tensor:
        # diffusers' tower (never compiled) with eager attention: what SDPA saves.
        with attention(checker.vision_model, "eager"):
            return checker.visual_projection(checker.vision_model(pixels)[1])  # [B, D]

    def diffusers_preprocess(images: torch.Tensor) -> torch.Tensor:
        # StableDiffusionPipeline.run_safety_checker, line for line.
        pil = vae_processor.postprocess(images, output_type="pil")
        inputs = models.feature_extractor(pil, return_tensors="pt").to(device)
        return inputs.pixel_values.to(dtype)

    def diffusers_path(images: torch.Tensor) -> list[bool]:
        clip_input = diffusers_preprocess(images)
        return checker(images=images, clip_input=clip_input)[1]

    def ours_path(images: torch.Tensor) -> list[bool]:
        return moderator.moderate(images, value_range="-1,1").flagged

    forward_rows, e2e_rows = [], []
    with quiet_diffusers():
        # First calls allocate and pick kernels; keep that out of every row.
        first = decoded(1)
        floor(_ready_pixels(first, encoder, dtype))
        eager_floor(_ready_pixels(first, encoder, dtype))
        diffusers_path(first.clone())
        ours_path(first.clone())
        for batch in config.batch_sizes:
            say(f"end to end, batch {batch}: forward, diffusers, ours ({repeats} repeats)")
            images = decoded(batch)
            pixels = _ready_pixels(images, encoder, dtype)
            timed = {"repeats": repeats, "warmup": config.warmup, "device": device}
            timings, results = measure_interleaved(
                {
                    "forward": (floor, functools.partial(_same, pixels)),
                    "eager": (eager_floor, functools.partial(_same, pixels)),
                    "pre": (diffusers_preprocess, functools.partial(_same, images)),
                    # The checker blacks out flagged images in place: each call gets a copy.
                    "diffusers": (diffusers_path, images.clone),
                    "ours": (ours_path, images.clone),
                },
                min_seconds=config.e2e_seconds,
                **timed,
            )
            forward, eager, pre, theirs, ours = (
                timings[k] for k in ("forward", "eager", "pre", "diffusers", "ours")
            )
            their_flags, our_flags = results["diffusers"], results["ours"]
            stages = ours_stages(moderator, images, {**timed, "min_seconds": config.fast_seconds})
            syncs = {
                name: count_host_syncs(functools.partial(path, images.clone()), device)
                for name, path in (("diffusers", diffusers_path), ("ours", ours_path))
            }
            floor_ms = forward.median_ms
            forward_rows.append(
                {
                    "batch": batch,
                    "ms": floor_ms,
                    "eager_ms": eager.median_ms,
                    "timing": forward.to_dict(),
                    "eager_timing": eager.to_dict(),
                }
            )
            e2e_rows.append(
                {
                    "batch": batch,
                    "forward_ms": floor_ms,
                    "diffusers_ms": theirs.median_ms,
                    "diffusers_preprocess_ms": pre.median_ms,
                    "forward_eager_ms": eager.median_ms,
                    "ours_ms": ours.median_ms,
                    "diffusers_x_forward": theirs.median_ms / floor_ms,
                    "ours_x_forward": ours.median_ms / floor_ms,
                    "speedup": theirs.median_ms / ours.median_ms,
                    "flags_agree": _agreement(their_flags, our_flags),
                    "ours_stages_ms": stages,
                    "host_syncs": syncs,  # CUDA only: times the host waited for the GPU
                    "timing": {
                        "forward": forward.to_dict(),
                        "forward_eager": eager.to_dict(),
                        "diffusers": theirs.to_dict(),
                        "diffusers_preprocess": pre.to_dict(),
                        "ours": ours.to_dict(),
                    },
                }
            )
    return forward_rows, e2e_rows


def ours_stages(moderator: Any, images: torch.Tensor, timed: dict[str, Any]) -> dict[str, float]:
    """Median ms of each step of Moderator.moderate but the encoder (which is the floor)."""
    from moderation.actions import apply_actions, policy_settings
    from moderation.decision import decide
    from moderation.images import clip_preprocess, to_image_batch
    from moderation.scoring import score

    encoder, policy = moderator.encoder, moderator.policy
    settings = {"size": encoder.image_size, "mean": encoder.image_mean, "std": encoder.image_std}
    metas = [{} for _ in range(images.shape[0])]
    act = policy_settings(policy)

    def convert(_: Any) -> Any:
        return to_image_batch(images, device=encoder.device, value_range="-1,1")

    batch = convert(None)
    embeddings = encoder.encode_image(clip_preprocess(batch, **settings)).float()  # [B, D]

    def decisions(_: Any) -> list[Any]:
        return decide(policy, score(policy, embeddings), embeddings=embeddings, metadata=metas)

    actions = [d.action for d in decisions(None)]
    moderated = apply_actions(batch.images, actions, **act)
    keep = torch.tensor([a == "allow" for a in actions])  # allowed images go back bit for bit
    steps = {
        "to_image_batch": convert,
        "clip_preprocess": lambda _: clip_preprocess(batch, **settings),
        "score_decide": decisions,
        "apply_actions": lambda _: apply_actions(batch.images, actions, **act),
        "to_caller": lambda _: batch.to_caller(moderated, keep=keep),
    }
    return {name: measure(fn, **timed)[0].median_ms for name, fn in steps.items()}


def _same(value: Any) -> Any:
    return value


def _ready_pixels(images: torch.Tensor, encoder: Any, dtype: torch.dtype) -> torch.Tensor:
    """CLIP pixel values [B,3,S,S] of decoded images, on their device in the tower's dtype."""
    from moderation.images import clip_preprocess

    unit = (images.float() * 0.5 + 0.5).clamp(0, 1)  # [-1,1] -> [0,1]
    pixels = clip_preprocess(
        unit, size=encoder.image_size, mean=encoder.image_mean, std=encoder.image_std
    )
    return pixels.to(dtype)


def _agreement(theirs: list[bool], ours: list[bool]) -> str:
    """'k/n' images on which diffusers and we agree about being flagged."""
    same = sum(bool(a) == bool(b) for a, b in zip(theirs, ours, strict=True))
    return f"{same}/{len(ours)}"


def run_concepts(
    config: BenchConfig,
    device: torch.device,
    dtype: torch.dtype,
    dim: int,
    forward_rows: list[dict[str, Any]],
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Rows of section c: diffusers' loops vs score + decide, for each concept count."""
    from moderation.bench.models import concept_policy, loops_checker, sparse_thresholds
    from moderation.engine import Moderator

    batch = config.concept_batch
    generator = torch.Generator().manual_seed(config.seed + 1)
    embeddings = torch.randn(batch, dim, generator=generator).to(device, dtype)  # [B, D]
    special = torch.randn(3, dim, generator=generator)  # [S, D]
    special_thresholds = sparse_thresholds(3, dim, generator)
    floor_ms = next((r["ms"] for r in forward_rows if r["batch"] == batch), None)
    timed = {
        "repeats": config.repeats,
        "warmup": max(config.warmup, 1),
        "device": device,
        "min_seconds": config.fast_seconds,
    }
    rows = []
    with quiet_diffusers():
        for n in config.concepts:
            concepts = torch.randn(n, dim, generator=generator)  # [N, D]
            thresholds = sparse_thresholds(n, dim, generator)
            checker = loops_checker(
                concepts, thresholds, special, special_thresholds, device=device, dtype=dtype
            )
            policy = concept_policy(
                concepts, thresholds, special, special_thresholds, model_id="bench", name=f"c{n}"
            )
            moderator = Moderator(policy.to(device))
            # diffusers' loops are per image: time a subset of the batch and scale linearly.
            timed_images = min(batch, max(1, math.ceil(config.loop_budget / n)))
            clip_input = embeddings[:timed_images]
            say(f"after the encoder, {n} concepts (diffusers on {timed_images}/{batch} images)")
            theirs, their_flags = measure(
                functools.partial(_run_checker, checker, clip_input),
                # Placeholder images: the time is the loops, not copying full-size images.
                setup=functools.partial(np.zeros, (timed_images, 1, 1, 3), np.float32),
                **timed,
            )
            ours, decisions = measure(
                functools.partial(_run_moderator, moderator, embeddings), **timed
            )
            diffusers_ms = theirs.median_ms * batch / timed_images
            fired = sum(len(d.fired) for d in decisions) / len(decisions)
            rows.append(
                {
                    "concepts": n,
                    "batch": batch,
                    "diffusers_ms": diffusers_ms,
                    "ours_ms": ours.median_ms,
                    "speedup": diffusers_ms / ours.median_ms,
                    "ours_pct_of_forward": (
                        100 * ours.median_ms / floor_ms if floor_ms is not None else None
                    ),
                    "diffusers_timed_images": timed_images,
                    "diffusers_scaled": timed_images < batch,
                    "fired_per_image": fired,
                    "flags_agree": _agreement(
                        their_flags, [d.flagged for d in decisions[:timed_images]]
                    ),
                    "timing": {"diffusers": theirs.to_dict(), "ours": ours.to_dict()},
                }
            )
            del checker, policy, moderator
    return rows


def _run_checker(checker: torch.nn.Module, clip_input: torch.Tensor, images: Any) -> list[bool]:
    return checker(clip_input=clip_input, images=images)[1]


def _run_moderator(moderator: Any, embeddings: torch.Tensor, _setup: Any) -> list[Any]:
    return moderator.moderate_embeddings(embeddings)
