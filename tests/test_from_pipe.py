"""`Pipeline.from_pipe(pipe)` keeps our checker (the same object) in every family with the slot."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import (
    IFImg2ImgPipeline,
    IFInpaintingPipeline,
    IFPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionLDM3DPipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPImageProcessor

from moderation.integrations.diffusers import PolicySafetyChecker
from moderation.integrations.three_value import ThreeValueSafetyChecker
from moderation.synthetic import build_safety_checker
from tests.pipelines_factory import deepfloyd_if, ldm3d, one_concept_policy, sd, upscaler


@pytest.fixture(scope="module")
def tower():
    return build_safety_checker(seed=1)


def ours(tower, cls=PolicySafetyChecker):
    return cls.from_checker(tower, one_concept_policy("tiny", 1.0, "blur"))


@pytest.mark.parametrize(
    "target",
    [StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline],
)
def test_stable_diffusion_switches_keep_our_checker(tower, target, caplog):
    checker = ours(tower)
    pipe = sd(safety_checker=checker).pipe
    with caplog.at_level(logging.WARNING):
        switched = target.from_pipe(pipe)
    assert switched.safety_checker is checker
    assert "not switched over" not in caplog.text
    assert switched.config.safety_checker == (
        "moderation.integrations.diffusers",
        "PolicySafetyChecker",
    )


def test_the_switched_pipeline_moderates_with_it(tower):
    checker = ours(tower)
    pipe = sd(safety_checker=checker).pipe
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    out = img2img(
        "a photo of a dolphin",
        image=torch.rand(1, 3, 64, 64),
        num_inference_steps=2,
        strength=0.5,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.nsfw_content_detected == [False]
    assert len(checker.last_decisions) == 1


def test_diffusers_own_checker_switches_over_too():
    theirs = build_safety_checker(seed=1)
    assert isinstance(theirs, StableDiffusionSafetyChecker)
    pipe = sd(safety_checker=theirs).pipe
    assert StableDiffusionImg2ImgPipeline.from_pipe(pipe).safety_checker is theirs


def test_ldm3d_keeps_our_checker(tower):
    checker = ours(tower)
    pipe = ldm3d(safety_checker=checker).pipe
    assert StableDiffusionLDM3DPipeline.from_pipe(pipe).safety_checker is checker


@pytest.mark.parametrize("target", [IFImg2ImgPipeline, IFInpaintingPipeline, IFPipeline])
def test_deepfloyd_if_switches_keep_our_checker(tower, target):
    checker = ours(tower, ThreeValueSafetyChecker)
    pipe = deepfloyd_if(safety_checker=checker, feature_extractor=CLIPImageProcessor()).pipe
    assert target.from_pipe(pipe).safety_checker is checker


def test_the_upscaler_keeps_our_checker(tower):
    checker = ours(tower, ThreeValueSafetyChecker)
    pipe = upscaler(safety_checker=checker, feature_extractor=CLIPImageProcessor()).pipe
    assert StableDiffusionUpscalePipeline.from_pipe(pipe).safety_checker is checker


def test_equality_stands_in_only_for_the_slot_class():
    assert PolicySafetyChecker == StableDiffusionSafetyChecker
    assert StableDiffusionSafetyChecker == PolicySafetyChecker
    assert PolicySafetyChecker != ThreeValueSafetyChecker
    assert PolicySafetyChecker != torch.nn.Module
    assert not issubclass(PolicySafetyChecker, StableDiffusionSafetyChecker)
    assert len({PolicySafetyChecker, StableDiffusionSafetyChecker}) == 2  # hashing unchanged


@pytest.mark.slow  # imports every diffusers pipeline module
def test_every_pipeline_with_the_slot_would_keep_our_checker():
    """from_pipe keeps a model component when `type(component) in` the new pipeline's type hint
    for the slot: true for one of our checkers in every diffusers pipeline that has the slot,
    except Cosmos, whose checker is another API (check_text_safety / check_video_safety)."""
    import inspect

    import diffusers

    fits, misfits = [], []
    for name in dir(diffusers):
        if not name.endswith("Pipeline") or name.startswith(("Flax", "Onnx")):
            continue
        cls = getattr(diffusers, name)
        if "safety_checker" not in inspect.signature(cls.__init__).parameters:
            continue
        types = cls._get_signature_types()["safety_checker"]
        ours = [c for c in (PolicySafetyChecker, ThreeValueSafetyChecker) if c in types]
        (fits if ours else misfits).append(name)
    assert len(fits) >= 40  # the SD family, LDM3D, ControlNet, PAG, IF, the upscaler, ...
    assert {"StableDiffusionImg2ImgPipeline", "IFInpaintingPipeline"} <= set(fits)
    assert all(name.startswith("Cosmos") for name in misfits), misfits
