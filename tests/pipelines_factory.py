"""Tiny diffusers pipelines of many families, built offline from configs (random weights).

Each builder returns a `TinyPipeline`: the pipeline and the keyword arguments of one call
(prompt embeddings instead of a prompt where a text tower cannot be built offline). Widths and
sizes are the smallest that run each family's code paths; a call takes well under a second on a
CPU. `build(name)` caches every pipeline for the test session.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moderation.bench.tiny_pipelines import (
    STEPS,
    char_tokenizer,
    clip_text_config,
    sdxl_pipeline,
    text_to_video_pipeline,
    tiny_vae,
)


@dataclass
class TinyPipeline:
    name: str
    pipe: Any
    inputs: dict[str, Any]  # one call's arguments, without generator and output_type
    kind: str = "image"  # image | video | three-value
    images_per_call: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    def call_args(self, seed: int = 0, **overrides: Any) -> dict[str, Any]:
        """The call's arguments with a fresh generator (same seed, same output)."""
        return {
            **self.inputs,
            "generator": torch.Generator().manual_seed(seed),
            **overrides,
        }


def _sd_unet(cross_attention_dim=64, **config):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        **config,
    )


def _sd_parts(cross_attention_dim=64, **vae):
    """unet, vae, text_encoder, tokenizer of a tiny Stable Diffusion 1.x."""
    from transformers import CLIPTextModel

    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    unet = _sd_unet(cross_attention_dim)
    torch.manual_seed(0)
    vae_model = tiny_vae(**vae)
    torch.manual_seed(0)
    text = CLIPTextModel(clip_text_config(tokenizer, hidden_size=cross_attention_dim))
    return unet, vae_model, text, tokenizer


SD_CALL = {"prompt": "a photo of a dolphin", "num_inference_steps": STEPS}
SIZE_64 = {"height": 64, "width": 64}


def sd(pipeline_class=None, safety_checker=None) -> TinyPipeline:
    """Stable Diffusion 1.x text-to-image (no checker unless given)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPImageProcessor

    unet, vae, text, tokenizer = _sd_parts()
    pipe = (pipeline_class or StableDiffusionPipeline)(
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        safety_checker=safety_checker,
        feature_extractor=CLIPImageProcessor(),
        requires_safety_checker=False,
    )
    inputs = {**SD_CALL, **SIZE_64, "num_images_per_prompt": 2}
    return TinyPipeline("sd", pipe, inputs)


def sdxl() -> TinyPipeline:
    pipe, inputs = sdxl_pipeline()
    return TinyPipeline("sdxl", pipe, inputs)


def _embeds(batch: int, tokens: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, tokens, width, generator=torch.Generator().manual_seed(seed))


def sd3() -> TinyPipeline:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    torch.manual_seed(0)
    vae = tiny_vae(
        block_out_channels=(4,),
        layers_per_block=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    inputs = {
        "prompt_embeds": _embeds(2, 8, 32),
        "pooled_prompt_embeds": _embeds(1, 2, 64)[0],
        "guidance_scale": 1.0,
        "num_inference_steps": STEPS,
        "height": 32,
        "width": 32,
    }
    return TinyPipeline("sd3", pipe, inputs)


def flux() -> TinyPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    torch.manual_seed(0)
    vae = tiny_vae(
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    inputs = {
        "prompt_embeds": _embeds(2, 8, 32),
        "pooled_prompt_embeds": _embeds(1, 2, 32)[0],
        "num_inference_steps": STEPS,
        "height": 32,
        "width": 32,
    }
    return TinyPipeline("flux", pipe, inputs)


def pixart() -> TinyPipeline:
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=1,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    torch.manual_seed(0)
    vae = tiny_vae(block_out_channels=[8, 16], norm_num_groups=8)
    pipe = PixArtAlphaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        transformer=transformer,
        scheduler=DDIMScheduler(),
    )
    inputs = {
        "prompt_embeds": _embeds(2, 8, 32),
        "prompt_attention_mask": torch.ones(2, 8, dtype=torch.long),
        "guidance_scale": 1.0,
        "use_resolution_binning": False,
        "num_inference_steps": STEPS,
        "height": 32,
        "width": 32,
    }
    return TinyPipeline("pixart", pipe, inputs)


def text_to_video() -> TinyPipeline:
    pipe, inputs = text_to_video_pipeline()
    return TinyPipeline("text-to-video", pipe, inputs, kind="video")


def image_to_video() -> TinyPipeline:
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=8,
        projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        latent_channels=4,
    )
    torch.manual_seed(0)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            projection_dim=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            intermediate_size=37,
            patch_size=4,
        )
    )
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
    )
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    inputs = {
        "image": image,
        "num_frames": 3,
        "decode_chunk_size": 3,
        "num_inference_steps": STEPS,
        "min_guidance_scale": 1.0,
        "max_guidance_scale": 1.0,
        "height": 32,
        "width": 32,
    }
    return TinyPipeline("image-to-video", pipe, inputs, kind="video")


def _if_unet(in_channels: int, **extra):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        layers_per_block=1,
        block_out_channels=[32, 64],
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        in_channels=in_channels,
        out_channels=6,
        cross_attention_dim=32,
        encoder_hid_dim=32,
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
        **extra,
    )
    unet.set_attn_processor(AttnAddedKVProcessor())
    return unet


def _if_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        beta_start=0.0001,
        beta_end=0.02,
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.0,
        prediction_type="epsilon",
        variance_type="learned_range",
    )


def deepfloyd_if(safety_checker=None, feature_extractor=None) -> TinyPipeline:
    """DeepFloyd IF stage I (T5 prompt embeddings precomputed; no watermarker)."""
    from diffusers import IFPipeline

    pipe = IFPipeline(
        tokenizer=None,
        text_encoder=None,
        unet=_if_unet(3),
        scheduler=_if_scheduler(),
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
        watermarker=None,
        requires_safety_checker=False,
    )
    inputs = {
        "prompt_embeds": _embeds(2, 8, 32),
        "negative_prompt_embeds": _embeds(2, 8, 32, seed=2),
        "num_inference_steps": STEPS,
        "height": 16,
        "width": 16,
    }
    return TinyPipeline("deepfloyd-if", pipe, inputs, kind="three-value")


def upscaler(safety_checker=None, feature_extractor=None) -> TinyPipeline:
    """StableDiffusionUpscalePipeline: 16x16 in, 64x64 out (a 4x VAE)."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=7,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        use_linear_projection=True,
        only_cross_attention=(True, True, False),
        num_class_embeds=100,
    )
    torch.manual_seed(0)
    vae = tiny_vae(block_out_channels=[32, 32, 64])
    torch.manual_seed(0)
    text = CLIPTextModel(clip_text_config(tokenizer, hidden_size=32))
    pipe = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        low_res_scheduler=DDPMScheduler(),
        scheduler=DDIMScheduler(prediction_type="v_prediction"),
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
        max_noise_level=350,
    )
    low_res = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    inputs = {
        "prompt": ["a dolphin", "a cat"],
        "image": low_res,
        "noise_level": 20,
        "num_inference_steps": STEPS,
    }
    return TinyPipeline("sd-upscaler", pipe, inputs, kind="three-value")


def ldm3d(safety_checker=None, feature_extractor=None) -> TinyPipeline:
    """StableDiffusionLDM3DPipeline: a VAE of 6 channels (colour + depth as RGB-like), as
    Intel/ldm3d (diffusers cannot make PIL depth maps of ldm3d-4c's 4 channels here)."""
    from diffusers import DDIMScheduler, StableDiffusionLDM3DPipeline
    from transformers import CLIPImageProcessor

    unet, vae, text, tokenizer = _sd_parts(in_channels=6, out_channels=6)
    pipe = StableDiffusionLDM3DPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=safety_checker,
        feature_extractor=feature_extractor or CLIPImageProcessor(),
        image_encoder=None,
        requires_safety_checker=False,
    )
    processor = pipe.image_processor
    processor.numpy_to_depth = functools.partial(_numpy_to_depth, processor)
    inputs = {**SD_CALL, "height": 32, "width": 32, "num_images_per_prompt": 4}
    return TinyPipeline("ldm3d", pipe, inputs, images_per_call=4)


def _numpy_to_depth(processor, images):
    """diffusers 0.42's `VaeImageProcessorLDM3D.numpy_to_depth` passes `mode="I;16"` to
    `Image.fromarray`, which this Pillow refuses for uint16 arrays ("Invalid mode for data
    type"), so every LDM3D call with a safety checker (its run_safety_checker makes PIL images
    first) raises. The same depth maps, with the mode Pillow infers from uint16 (I;16)."""
    from PIL import Image

    depth = [processor.rgblike_to_depthmap(image[:, :, 3:]) for image in images]
    return [Image.fromarray(d.astype("uint16")) for d in depth]


BUILDERS: dict[str, Callable[[], TinyPipeline]] = {
    "sd": sd,
    "sdxl": sdxl,
    "sd3": sd3,
    "flux": flux,
    "pixart": pixart,
    "text-to-video": text_to_video,
    "image-to-video": image_to_video,
    "deepfloyd-if": deepfloyd_if,
    "sd-upscaler": upscaler,
    "ldm3d": ldm3d,
}
IMAGE_FAMILIES = ("sd", "sdxl", "sd3", "flux", "pixart", "deepfloyd-if", "sd-upscaler")
VIDEO_FAMILIES = ("text-to-video", "image-to-video")


@functools.cache
def build(name: str) -> TinyPipeline:
    """The tiny pipeline `name`, built once per session (progress bars off)."""
    tiny = BUILDERS[name]()
    tiny.pipe.set_progress_bar_config(disable=True)
    return tiny


def one_concept_policy(
    model: str, threshold: float, action: str = "blur", direction=None, **fields: Any
):
    """A compiled policy of one concept along `direction` (default all ones) of `model`'s
    32-wide embeddings: threshold 1.0 fires on nothing (allow everything), -1.0 on everything."""
    import torch.nn.functional as F

    from policy.compiled import CompiledPolicy

    return CompiledPolicy(
        name="pipeline-test",
        version="1",
        model=str(model),
        concept_names=("anything",),
        categories=(None,),
        severities=("medium",),
        actions=(action,),
        concept_matrix=F.normalize(torch.ones(1, 32) if direction is None else direction[None]),
        thresholds=torch.tensor([threshold], dtype=torch.float32),
        escalate="review",
        **fields,
    )


def outputs_of(output: Any) -> Any:
    """The images (or video frames) of a pipeline output."""
    return output.frames if hasattr(output, "frames") else output.images


def identical(a: Any, b: Any) -> bool:
    """Same type and the same values, pixel for pixel (tensors, arrays, PIL images, lists)."""
    import numpy as np

    if type(a) is not type(b):
        return False
    if torch.is_tensor(a):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b, strict=True))
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))
