"""Tiny CLIP and safety-checker checkpoints built offline, for tests and the offline demo.

Nothing here downloads: the tokenizer is character-level (CLIP's 256 byte characters, no merges)
and the weights are random after a fixed seed, so every checkpoint is reproducible.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Widths of the tiny models (~1.5 MB): enough to exercise every code path in milliseconds.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
TINY_PROJECTION = 32
# openai/clip-vit-large-patch14's vision tower, the one the Stable Diffusion safety checker uses.
VIT_L14 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
}
VIT_L14_PATCH = 14
VIT_L14_PROJECTION = 768


def _bytes_to_unicode() -> list[str]:
    """CLIP's (GPT-2's) reversible map from the 256 byte values to printable characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_char_tokenizer(folder: str | Path):
    """Write a character-level CLIPTokenizer (vocab.json + merges.txt) into folder and return it."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    # model_max_length must be set: without it padding/truncation overflow.
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def clip_config(
    *,
    vision: dict | None = None,
    text: dict | None = None,
    patch_size: int = 32,
    projection_dim: int = TINY_PROJECTION,
    vocab_size: int = 514,
):
    """A CLIPConfig with tiny widths unless vision/text widths are given."""
    from transformers import CLIPConfig

    text_config = {
        **TINY,
        **(text or {}),
        "vocab_size": vocab_size,
        "max_position_embeddings": 77,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }
    vision_config = {**TINY, **(vision or {}), "patch_size": patch_size, "image_size": 224}
    return CLIPConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=projection_dim
    )


def make_tiny_clip(
    folder: str | Path, *, seed: int = 0, projection_dim: int = TINY_PROJECTION
) -> Path:
    """Save a random tiny CLIPModel with its tokenizer and image processor; return the folder."""
    from transformers import CLIPImageProcessor, CLIPModel

    folder = Path(folder)
    tokenizer = write_char_tokenizer(folder)
    torch.manual_seed(seed)
    model = CLIPModel(clip_config(projection_dim=projection_dim, vocab_size=len(tokenizer))).eval()
    model.save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)
    return folder


def quiet_tiny_clip(folder: Path) -> Path:
    """make_tiny_clip(folder), without the libraries' progress bars and notices."""
    import os

    # Building the model is not the demo's news: no "Writing model shards" bars, no notices
    # about optional backends (the engine preprocesses in torch, without them).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return make_tiny_clip(folder)
    finally:
        transformers_logging.set_verbosity(verbosity)


def build_safety_checker(
    *,
    seed: int = 0,
    size: str = "tiny",
    n_concepts: int = 17,
    n_special: int = 3,
):
    """A StableDiffusionSafetyChecker with random weights, concept embeddings and thresholds.

    size is "tiny" or "vit-l" (ViT-L/14 widths, ~1.2 GB of float32 weights). Thresholds are drawn
    near the typical cosines of random images so that tests see concepts fire and not fire.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    if size == "tiny":
        config = clip_config()
    elif size == "vit-l":
        config = clip_config(
            vision=VIT_L14, patch_size=VIT_L14_PATCH, projection_dim=VIT_L14_PROJECTION
        )
    else:
        raise ValueError(f"size must be 'tiny' or 'vit-l', not {size!r}")
    # The checker's constructor refuses SDPA (from_pretrained picks SDPA itself on loading).
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    checker = StableDiffusionSafetyChecker(config).eval()
    dim = config.projection_dim
    # diffusers hard-codes 17 and 3 rows at init; a checkpoint may carry any number.
    checker.concept_embeds = torch.nn.Parameter(torch.randn(n_concepts, dim), requires_grad=False)
    checker.special_care_embeds = torch.nn.Parameter(
        torch.randn(n_special, dim), requires_grad=False
    )
    checker.concept_embeds_weights = torch.nn.Parameter(
        0.05 * torch.randn(n_concepts), requires_grad=False
    )
    checker.special_care_embeds_weights = torch.nn.Parameter(
        0.05 * torch.randn(n_special), requires_grad=False
    )
    return checker


def make_safety_checker(folder: str | Path, **kwargs) -> Path:
    """Save build_safety_checker(**kwargs) with save_pretrained (current key layout); return folder."""
    folder = Path(folder)
    build_safety_checker(**kwargs).save_pretrained(folder)
    return folder


def make_tiny_pipeline(safety_checker=None, feature_extractor=None):
    """A tiny StableDiffusionPipeline (64x64, runs on a CPU in well under a second)."""
    import tempfile

    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_char_tokenizer(tmp)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **TINY,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=len(tokenizer) - 2,
            eos_token_id=len(tokenizer) - 1,
            pad_token_id=len(tokenizer) - 1,
        )
    )
    return StableDiffusionPipeline(
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=safety_checker,
        feature_extractor=feature_extractor or CLIPImageProcessor(),
        requires_safety_checker=False,
    )
