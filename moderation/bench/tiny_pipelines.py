"""Tiny diffusers pipelines built offline from configs (random weights), for the bench's
pipelines section and the tests (tests/pipelines_factory.py builds the other families)."""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from moderation.synthetic import TINY, write_char_tokenizer

STEPS = 2


def char_tokenizer():
    with tempfile.TemporaryDirectory() as tmp:
        return write_char_tokenizer(tmp)


def clip_text_config(tokenizer, **widths):
    from transformers import CLIPTextConfig

    n = len(tokenizer)
    return CLIPTextConfig(
        **{**TINY, **widths},
        vocab_size=n,
        max_position_embeddings=77,
        bos_token_id=n - 2,
        eos_token_id=n - 1,
        pad_token_id=n - 1,
    )


def tiny_vae(**config):
    from diffusers import AutoencoderKL

    blocks = config.pop("block_out_channels", [32, 64])
    return AutoencoderKL(
        block_out_channels=blocks,
        in_channels=config.pop("in_channels", 3),
        out_channels=config.pop("out_channels", 3),
        latent_channels=config.pop("latent_channels", 4),
        down_block_types=["DownEncoderBlock2D"] * len(blocks),
        up_block_types=["UpDecoderBlock2D"] * len(blocks),
        **config,
    )


def sdxl_pipeline(size: int = 64, images: int = 2) -> tuple[Any, dict[str, Any]]:
    """A tiny SDXL-shaped pipeline (two text towers, text_time embeddings) and one call."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 x 8 time ids + 32 pooled
        cross_attention_dim=64,  # 32 + 32 hidden
    )
    torch.manual_seed(0)
    vae = tiny_vae()
    torch.manual_seed(0)
    text = CLIPTextModel(clip_text_config(tokenizer, hidden_size=32))
    text_2 = CLIPTextModelWithProjection(
        clip_text_config(tokenizer, hidden_size=32, projection_dim=32)
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text,
        text_encoder_2=text_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
        add_watermarker=False,
    )
    inputs = {
        "prompt": "a photo of a dolphin",
        "num_inference_steps": STEPS,
        "height": size,
        "width": size,
        "num_images_per_prompt": images,
    }
    return pipe, inputs


def text_to_video_pipeline(
    size: int = 32, frames: int = 3, videos: int = 2
) -> tuple[Any, dict[str, Any]]:
    """A tiny TextToVideoSDPipeline and one call."""
    from diffusers import DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
    from transformers import CLIPTextModel

    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    unet = UNet3DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=2,
    )
    torch.manual_seed(0)
    vae = tiny_vae(block_out_channels=[8, 16], norm_num_groups=2)
    torch.manual_seed(0)
    text = CLIPTextModel(clip_text_config(tokenizer, hidden_size=32))
    pipe = TextToVideoSDPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler()
    )
    prompts = ["a dolphin swimming", "a cat"]
    inputs = {
        "prompt": [prompts[i % 2] for i in range(videos)],
        "num_frames": frames,
        "num_inference_steps": STEPS,
        "height": size,
        "width": size,
    }
    return pipe, inputs
