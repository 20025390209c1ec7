"""PolicySafetyChecker in a real (tiny) StableDiffusionPipeline's safety_checker slot, end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moderation.integrations.diffusers import PolicySafetyChecker
from moderation.integrations.towers import VisionTower
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


def one_concept_policy(direction, threshold, action, **fields) -> CompiledPolicy:
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
        **fields,
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


def install(setup, action, **fields):
    policy = one_concept_policy(setup["direction"], setup["threshold"], action, **fields)
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


def test_blur_pt(setup):
    """output_type="pt": the flagged tensor comes back blurred in [0, 1], the other untouched."""
    install(setup, "blur")
    out = generate(setup["pipe"], output_type="pt")
    assert out.nsfw_content_detected == [True, False]
    images = out.images.permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
    assert images[0].min() >= 0 and images[0].max() <= 1
    assert total_variation(images[0]) < 0.5 * total_variation(setup["plain"][0])
    assert np.array_equal(images[1], setup["plain"][1])


def vae_batch(seed=0):
    """Two [3, 32, 32] images as diffusers hands them over: VAE output, overshooting [-1, 1]."""
    return 1.3 * torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1.3


def test_a_policy_judges_the_images_not_clip_input(setup):
    """Without `compat: diffusers` the views come from `images` (what the user sees): a
    different clip_input changes nothing, a different image changes its own decision."""
    ours = install(setup, "blur")
    images = vae_batch()
    runs = []
    for clip_input, batch in [
        (torch.zeros(2, 3, 224, 224), images.clone()),
        (torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)), images.clone()),
        (torch.zeros(2, 3, 224, 224), torch.cat([images[1:], images[1:]])),
    ]:
        ours(clip_input=clip_input, images=batch)
        runs.append([d.embedding for d in ours.last_decisions])
    assert all(np.array_equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not np.array_equal(runs[2][0], runs[0][0])
    assert np.array_equal(runs[2][1], runs[0][1])
    # Older pipelines hand over numpy [B, H, W, 3] in [0, 1]: the same pixels, the same verdict.
    shown = (images.clamp(-1, 1) * 0.5 + 0.5).permute(0, 2, 3, 1).numpy()
    ours(clip_input=torch.zeros(2, 3, 224, 224), images=shown)
    assert all(
        np.array_equal(d.embedding, e) for d, e in zip(ours.last_decisions, runs[0], strict=True)
    )


def test_a_compat_policy_judges_clip_input(setup):
    """`compat: diffusers` scores the pipeline's clip_input, as diffusers does (parity)."""
    ours = PolicySafetyChecker.from_checker(setup["checker"])
    clip_input = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    for images in (vae_batch(0), vae_batch(1)):
        ours(clip_input=clip_input, images=images)
        expected = setup["encoder"].encode_image(clip_input).numpy()
        assert np.array_equal(np.stack([d.embedding[0] for d in ours.last_decisions]), expected)


def test_pixel_values_are_refused_for_a_policy_that_builds_its_views(setup):
    from moderation import Moderator
    from moderation.errors import ModerationError
    from moderation.integrations.towers import ModuleEncoder

    policy = one_concept_policy(setup["direction"], setup["threshold"], "blur")
    moderator = Moderator(policy, ModuleEncoder(setup["encoder"], policy))
    with pytest.raises(ModerationError) as err:
        moderator.moderate(vae_batch(), pixel_values=torch.zeros(2, 3, 224, 224))
    assert str(err.value) == (
        "policy 'pipeline-test' judges every pixel of an image, so it builds its own views: "
        "pass pixel_values only with a `compat: diffusers` policy"
    )
    compat = PolicySafetyChecker.from_checker(setup["checker"]).moderator
    with pytest.raises(ModerationError) as err:
        compat.moderate(vae_batch(), value_range="-1,1", pixel_values=torch.zeros(3, 3, 224, 224))
    assert str(err.value) == "pixel_values must be a tensor with one row for each of 2 images"


class TowerOnFire(Exception):
    pass


def on_fire(module, args):
    raise TowerOnFire("the vision tower is on fire")


def test_an_encoder_that_raises_gives_on_error_for_every_image(setup):
    ours = install(setup, "blackout", on_error="blur")
    hook = setup["encoder"].vision_model.register_forward_pre_hook(on_fire)
    try:
        out = generate(setup["pipe"])
    finally:
        hook.remove()
    assert out.nsfw_content_detected == [True, True]
    assert [(d.verdict, d.action) for d in ours.last_decisions] == [("error", "blur")] * 2
    assert ours.last_decisions[0].error == "TowerOnFire: the vision tower is on fire"
    for shown, plain in zip(out.images, setup["plain"], strict=True):
        assert total_variation(shown) < 0.5 * total_variation(plain)  # blurred, never as it was


@pytest.mark.parametrize(
    ("images", "error"),
    [
        (  # 4+ channels are colour + depth (LDM3D, test_ldm3d_slot); 2 is nothing shown
            torch.rand(2, 2, 8, 8),
            "ImageInputError: images: expected 3 channels, got 2",
        ),
        (
            [torch.rand(3, 8, 8), np.random.default_rng(0).random((8, 8, 3), dtype=np.float32)],
            "ImageInputError: images: a list mixes numpy and tensor images",
        ),
    ],
    ids=["two-channels", "mixed-list"],
)
def test_bad_input_fails_closed(setup, images, error):
    ours = install(setup, "blur")
    out, flags = ours(clip_input=torch.zeros(2, 3, 224, 224), images=images)
    assert flags == [True, True]
    assert [d.error for d in ours.last_decisions] == [error] * 2
    assert [d.action for d in ours.last_decisions] == ["blackout"] * 2
    assert all(float(np.abs(np.asarray(image)).max()) == 0 for image in out)


def test_error_decisions_that_cannot_be_recorded_are_said_so(setup, monkeypatch, caplog):
    """Judging fails and recording its error decisions fails too: the images are still blacked
    out, the decisions still returned, and their ids listed as not recorded."""
    ours = install(setup, "blur")

    def unrecordable(*args, **kwargs):
        raise RuntimeError("database and spool both gone")

    monkeypatch.setattr(ours.moderator, "fail", unrecordable)
    images = [torch.rand(2, 8, 8)] * 2  # two channels: judging fails
    with caplog.at_level("ERROR", logger="moderation.integrations.diffusers"):
        out, flags = ours(clip_input=torch.zeros(2, 3, 224, 224), images=images)
    assert flags == [True, True]
    assert [d.action for d in ours.last_decisions] == ["blackout"] * 2
    assert ours.last_unrecorded == [d.decision_id for d in ours.last_decisions]
    assert all(float(np.abs(np.asarray(image)).max()) == 0 for image in out)
    said = [r.getMessage() for r in caplog.records if r.name == "moderation.integrations.diffusers"]
    assert said[-1] == "moderation: 2 error decisions were NOT recorded: " + ", ".join(
        ours.last_unrecorded
    )


def test_pil_and_uint8_lists_are_acted_on(setup):
    """Lists of PIL images or uint8 arrays (callers other than diffusers) keep their form."""
    from PIL import Image

    ours = install(setup, "blur")
    hwc = (setup["plain"] * 255).round().astype(np.uint8)  # [2, H, W, 3]
    for images in ([Image.fromarray(a) for a in hwc], list(hwc.copy())):
        out, flags = ours(images=images)
        assert flags == [True, False]
        assert type(out[0]) is type(images[1])
        shown = [np.asarray(x) for x in out]
        assert shown[0].dtype == np.uint8 and not np.array_equal(shown[0], hwc[0])
        assert np.array_equal(shown[1], hwc[1])


def test_caller_metadata_goes_with_each_call(setup):
    ours = install(setup, "blur")
    ours.metadata = {"user": "u-1", "app": "demo"}
    with ours.caller(prompt=PROMPT, seed=0):
        with ours.caller(user="u-2"):
            generate(setup["pipe"])
            inner = [d.metadata for d in ours.last_decisions]
        generate(setup["pipe"])
        outer = [d.metadata for d in ours.last_decisions]
    generate(setup["pipe"])
    after = [d.metadata for d in ours.last_decisions]
    ours.metadata = None
    assert inner == [{"user": "u-2", "app": "demo", "prompt": PROMPT, "seed": 0}] * 2
    assert outer == [{"user": "u-1", "app": "demo", "prompt": PROMPT, "seed": 0}] * 2
    assert after == [{"user": "u-1", "app": "demo"}] * 2


def test_metadata_for_the_wrong_number_of_images_fails_closed(setup):
    ours = install(setup, "blur")
    ours.metadata = [{"prompt": PROMPT}]
    try:
        out = generate(setup["pipe"])
    finally:
        ours.metadata = None
    assert out.nsfw_content_detected == [True, True]
    assert [d.error for d in ours.last_decisions] == [
        "ModerationError: metadata has 1 entries for 2 images"
    ] * 2
    assert [d.metadata for d in ours.last_decisions] == [{}, {}]


def test_review_without_a_log_says_no_one_will_see_it(setup, caplog):
    install(setup, "review")
    with caplog.at_level("WARNING", logger="moderation.integrations.diffusers"):
        generate(setup["pipe"])
        generate(setup["pipe"])
    said = [r.getMessage() for r in caplog.records if "need review" in r.getMessage()]
    assert said == [
        "moderation: 1 images need review but this checker logs no decisions, so no reviewer "
        "will see them: build it with db=URL or call checker.log_to(URL)"
    ]


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
