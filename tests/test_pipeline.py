"""PolicySafetyChecker in a real (tiny) StableDiffusionPipeline's safety_checker slot, end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moderation.integrations.diffusers import PolicySafetyChecker, VisionTower
from moderation.synthetic import build_safety_checker, make_tiny_pipeline
from policy.compiled import CompiledPolicy

PROMPT = "a photo of a dolphin"


def generate(pipe, output_type="np"):
    return pipe(
        PROMPT,
        num_inference_steps=2,
        num_images_per_prompt=2,
        height=64,
        width=64,
        output_type=output_type,
        generator=torch.Generator().manual_seed(0),
    )


def one_concept_policy(direction, threshold, action) -> CompiledPolicy:
    return CompiledPolicy(
        name="pipeline-test",
        version="1",
        model="tiny",
        concept_names=("dolphin",),
        categories=(None,),
        severities=("medium",),
        actions=(action,),
        concept_matrix=F.normalize(direction[None]),
        thresholds=torch.tensor([threshold], dtype=torch.float32),
        escalate="review",
    )


@pytest.fixture(scope="module")
def setup():
    """A pipeline, an encoder, the unmoderated output and a concept that only image 0 matches."""
    checker = build_safety_checker(seed=1)
    encoder = VisionTower(checker.vision_model, checker.visual_projection)
    probe = PolicySafetyChecker(one_concept_policy(torch.ones(32), 1.0, "blackout"), encoder)
    pipe = make_tiny_pipeline(safety_checker=probe)
    plain = generate(pipe)
    assert plain.nsfw_content_detected == [False, False]
    e0, e1 = (d.embedding[0] for d in probe.last_decisions)  # one view each: [1, D]
    direction = torch.from_numpy(e0 / np.linalg.norm(e0) - e1 / np.linalg.norm(e1))
    cos = [float(F.cosine_similarity(direction, torch.from_numpy(e), dim=0)) for e in (e0, e1)]
    assert cos[0] > cos[1] + 0.05
    return {
        "pipe": pipe,
        "checker": checker,
        "encoder": encoder,
        "plain": plain.images,
        "direction": direction,
        "threshold": (cos[0] + cos[1]) / 2,
    }


def install(setup, action):
    policy = one_concept_policy(setup["direction"], setup["threshold"], action)
    ours = PolicySafetyChecker(policy, setup["encoder"])
    setup["pipe"].safety_checker = ours
    return ours


def test_the_pipeline_accepts_and_registers_it(setup):
    ours = install(setup, "blackout")
    pipe = setup["pipe"]
    assert pipe.config.safety_checker == (
        "moderation.integrations.diffusers",
        "PolicySafetyChecker",
    )
    assert "safety_checker" in pipe.components
    assert pipe.dtype == torch.float32 and pipe.device == torch.device("cpu")
    pipe.to(torch.float64)
    try:
        assert ours.dtype == torch.float64 and pipe.dtype == torch.float64
        assert ours.policy.concept_matrix.dtype == torch.float32  # the policy stays float32
    finally:
        pipe.to(torch.float32)
    pipe.to("cpu")
    assert ours.policy.device == torch.device("cpu") and ours.device == torch.device("cpu")


def test_blackout_numpy(setup):
    ours = install(setup, "blackout")
    out = generate(setup["pipe"])
    assert out.nsfw_content_detected == [True, False]
    assert (out.images[0] == 0).all()  # black
    assert np.array_equal(out.images[1], setup["plain"][1])  # untouched
    decisions = ours.last_decisions
    assert [d.verdict for d in decisions] == ["flag", "allow"]
    assert decisions[0].fired == ("dolphin",) and decisions[1].fired == ()
    assert decisions[0].margin > 0 > decisions[1].margin


def test_blackout_pil(setup):
    install(setup, "blackout")
    out = generate(setup["pipe"], output_type="pil")
    assert out.nsfw_content_detected == [True, False]
    assert np.asarray(out.images[0]).max() == 0
    expected = (setup["plain"][1] * 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(out.images[1]), expected)


def total_variation(image: np.ndarray) -> float:
    return float(np.abs(np.diff(image, axis=0)).mean() + np.abs(np.diff(image, axis=1)).mean())


@pytest.mark.parametrize("output_type", ["np", "pil"])
def test_blur(setup, output_type):
    ours = install(setup, "blur")
    out = generate(setup["pipe"], output_type=output_type)
    assert out.nsfw_content_detected == [True, False]
    assert ours.last_decisions[0].action == "blur"
    images = [
        np.asarray(im, dtype=np.float32) / (255 if output_type == "pil" else 1) for im in out.images
    ]
    original = setup["plain"][0]
    # Blurred, in the displayed [0, 1] range (the pipeline does not denormalise flagged images).
    assert total_variation(images[0]) < 0.5 * total_variation(original)
    assert abs(images[0].mean() - original.mean()) < 0.05
    assert np.abs(images[1] - setup["plain"][1]).max() <= (1 / 255 if output_type == "pil" else 0)


def test_review_gets_a_placeholder(setup):
    ours = install(setup, "review")
    out = generate(setup["pipe"])
    assert out.nsfw_content_detected == [True, False]
    assert ours.last_decisions[0].verdict == "review"
    assert total_variation(out.images[0]) < 0.5 * total_variation(setup["plain"][0])


def test_drop_in_for_diffusers_own_checker(setup):
    """from_checker(pipe.safety_checker) flags and blacks out exactly what diffusers' does."""
    checker = setup["checker"]
    encoder = setup["encoder"]
    with torch.no_grad():
        direction = setup["direction"]
        checker.concept_embeds[0] = direction
        checker.concept_embeds_weights.fill_(1.0)
        checker.concept_embeds_weights[0] = setup["threshold"]
        checker.special_care_embeds_weights.fill_(1.0)
    pipe = setup["pipe"]
    pipe.safety_checker = checker
    theirs = generate(pipe)
    ours = PolicySafetyChecker.from_checker(checker)
    assert ours.encoder.vision_model is encoder.vision_model  # shared, not copied
    pipe.safety_checker = ours
    mine = generate(pipe)
    assert theirs.nsfw_content_detected == mine.nsfw_content_detected == [True, False]
    assert np.array_equal(theirs.images, mine.images)
    # The same flags because the policy is the checker's own (edited) concepts, not by chance.
    policy = ours.policy
    assert policy.compat == "diffusers" and len(policy.concept_names) == 17
    assert torch.equal(policy.concept_matrix, F.normalize(checker.concept_embeds))
    assert torch.equal(policy.thresholds, checker.concept_embeds_weights)
    assert torch.equal(policy.special_matrix, F.normalize(checker.special_care_embeds))
    assert torch.equal(policy.special_thresholds, checker.special_care_embeds_weights)
    assert policy.adjustment == 0.01 and policy.escalate == "allow"
    assert (policy.on_error, policy.actions) == ("blackout", ("blackout",) * 17)
