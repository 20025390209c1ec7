"""A moderated pipeline is used like the pipeline: attributes, .to(), return_dict, metadata,
latents, diffusers' own checker, review and release, videos, and what it refuses."""

from __future__ import annotations

import importlib.util
import io
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from moderation.engine import Moderator
from moderation.errors import ModerationError
from moderation.integrations.diffusers import moderate_pipeline
from moderation.synthetic import build_safety_checker
from tests.pipelines_factory import build, identical, ldm3d, one_concept_policy, sd


@pytest.fixture(scope="module")
def sdxl(tiny_clip_dir):
    tiny = build("sdxl")
    return tiny, moderate_pipeline(tiny.pipe, one_concept_policy(tiny_clip_dir, 1.0))


def test_attributes_components_and_to_pass_through(sdxl):
    tiny, moderated = sdxl
    assert moderated.components is not None
    assert moderated.components.keys() == tiny.pipe.components.keys()
    assert moderated.unet is tiny.pipe.unet
    assert moderated.vae_scale_factor == tiny.pipe.vae_scale_factor
    scheduler = tiny.pipe.scheduler
    moderated.scheduler = scheduler  # set on the pipeline
    assert tiny.pipe.scheduler is scheduler
    assert moderated.to("cpu") is moderated
    assert moderated.device == torch.device("cpu")
    bare = tiny.pipe(**tiny.call_args(output_type="np")).images
    assert identical(moderated(**tiny.call_args(output_type="np")).images, bare)


def test_return_dict_false_gives_the_pipelines_tuple(sdxl):
    tiny, moderated = sdxl
    bare = tiny.pipe(**tiny.call_args(output_type="pt"), return_dict=False)
    ours = moderated(**tiny.call_args(output_type="pt"), return_dict=False)
    assert isinstance(ours, tuple) and len(ours) == len(bare)
    assert identical(ours[0], bare[0])
    assert len(moderated.last_decisions) == 2


def test_latents_are_refused_unless_allowed(sdxl, tiny_clip_dir, caplog):
    tiny, moderated = sdxl
    with pytest.raises(ModerationError, match='output_type="latent" returns latents'):
        moderated(**tiny.call_args(output_type="latent"))
    allowed = moderate_pipeline(
        tiny.pipe, one_concept_policy(tiny_clip_dir, -1.0), allow_latent=True
    )
    with caplog.at_level(logging.WARNING):
        out = allowed(**tiny.call_args(output_type="latent"))
    assert "nothing in this call was judged or logged" in caplog.text
    assert torch.equal(out.images, tiny.pipe(**tiny.call_args(output_type="latent")).images)
    assert allowed.last_decisions == []


def test_the_prompt_and_caller_metadata_are_logged(sdxl, tiny_clip_dir):
    tiny, moderated = sdxl
    with moderated.caller(user="alice", seed=0), moderated.caller(request="r1"):
        out = moderated(**tiny.call_args(prompt=["a cat", "a dog"], num_images_per_prompt=2))
    prompts = [d.metadata["prompt"] for d in out.decisions]
    assert prompts == ["a cat", "a cat", "a dog", "a dog"]
    assert {d.metadata["user"] for d in out.decisions} == {"alice"}
    assert out.decisions[0].metadata["request"] == "r1"
    quiet = moderate_pipeline(
        tiny.pipe,
        one_concept_policy(tiny_clip_dir, 1.0),
        log_prompt=False,
        metadata={"app": "demo"},
    )
    out = quiet(**tiny.call_args())
    assert "prompt" not in out.decisions[0].metadata
    assert out.decisions[0].metadata["app"] == "demo"


def test_bad_metadata_fails_closed(sdxl):
    tiny, moderated = sdxl
    with moderated.caller(user=object()):  # not storable as JSON
        out = moderated(**tiny.call_args(output_type="pt"))
    assert out.nsfw_content_detected == [True, True]
    assert {d.verdict for d in out.decisions} == {"error"}
    assert torch.all(out.images == 0)


def test_a_pipeline_keeps_diffusers_own_checker(tiny_clip_dir):
    """Both run: diffusers' checker inside the pipeline (black images), ours on its output."""
    theirs = build_safety_checker(seed=1)
    tiny = sd(safety_checker=theirs)
    tiny.pipe.set_progress_bar_config(disable=True)
    bare = tiny.pipe(**tiny.call_args(output_type="np"))
    moderated = moderate_pipeline(tiny.pipe, one_concept_policy(tiny_clip_dir, 1.0))
    out = moderated(**tiny.call_args(output_type="np"))
    assert moderated.safety_checker is theirs
    assert identical(out.images, bare.images)
    assert out.nsfw_content_detected == bare.nsfw_content_detected  # theirs, or ours


def test_a_moderator_can_be_the_policy(sdxl, tiny_clip_dir):
    tiny, _ = sdxl
    moderator = Moderator.from_policy(one_concept_policy(tiny_clip_dir, -1.0))
    moderated = moderate_pipeline(tiny.pipe, moderator)
    assert moderated.moderator is moderator
    assert moderated(**tiny.call_args()).nsfw_content_detected == [True, True]
    with pytest.raises(ModerationError, match="db cannot apply to a Moderator"):
        moderate_pipeline(tiny.pipe, moderator, db="sqlite://")


def test_ldm3d_is_sent_to_the_slot(tiny_clip_dir):
    with pytest.raises(ModerationError, match="moderate it in its safety_checker slot"):
        moderate_pipeline(ldm3d().pipe, one_concept_policy(tiny_clip_dir, 1.0))


def test_held_originals_are_released_after_approval(tiny_clip_dir, tmp_path):
    from moderation.review import ReviewError, ReviewQueue

    tiny = build("sdxl")
    url = f"sqlite:///{tmp_path / 'log.db'}"
    moderated = moderate_pipeline(
        tiny.pipe,
        one_concept_policy(tiny_clip_dir, -1.0, "review"),
        db=url,
        held_dir=tmp_path / "held",
        spool_dir=tmp_path / "spool",
    )
    out = moderated(**tiny.call_args(output_type="pt"))
    bare = tiny.pipe(**tiny.call_args(output_type="pt")).images
    first = out.decisions[0]
    assert first.action == "review" and out.nsfw_content_detected == [True, True]
    with pytest.raises(ReviewError, match="still awaiting review"):
        moderated.release(first.decision_id)
    queue = ReviewQueue(url)
    claims = {c.decision_id: c for c in queue.claim("alice", n=2)}
    queue.approve(claims[first.decision_id].item_id, "alice", token=claims[first.decision_id].token)
    png = moderated.release(first.decision_id)
    moderated.close()
    released = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32) / 255
    expected = bare[0].permute(1, 2, 0).numpy()
    assert np.abs(released - expected).max() <= 1 / 255 + 1e-6  # the original, not the blur


def test_every_frame_of_a_flagged_video_gets_its_action(tiny_clip_dir):
    tiny = build("text-to-video")
    probe = moderate_pipeline(tiny.pipe, one_concept_policy(tiny_clip_dir, 1.0))
    bare = probe(**tiny.call_args(output_type="pt")).frames  # [2, 3, 3, H, W]
    video0, video1 = (d.embedding for d in probe.last_decisions)  # [frames, D] each
    target = F.normalize(torch.from_numpy(video0[2]), dim=0)
    cos0 = F.normalize(torch.from_numpy(video0), dim=1) @ target
    cos1 = F.normalize(torch.from_numpy(video1), dim=1) @ target
    threshold = (float(cos0[2]) + max(float(cos0[:2].max()), float(cos1.max()))) / 2
    assert float(cos0[2]) > threshold > float(cos1.max())  # only frame 2 of video 0 fires
    policy = one_concept_policy(tiny_clip_dir, threshold, "blur", direction=target)
    for frame_batch in (1, 16):  # memory-bounded batches decide the same
        moderated = moderate_pipeline(tiny.pipe, policy, frame_batch=frame_batch)
        out = moderated(**tiny.call_args(output_type="pt"))
        first, second = out.decisions
        assert out.nsfw_content_detected == [True, False]
        assert first.metadata["deciding_frame"] == 2 and first.fired == ("anything",)
        assert [v["frame"] for v in first.views] == [0, 1, 2]
        for f in range(3):  # every frame blurred, none shown as it was
            assert not torch.equal(out.frames[0, f], bare[0, f])
        assert torch.equal(out.frames[1], bare[1])


@pytest.mark.slow  # six pipeline calls with every tensor copy counted
def test_no_image_sized_host_copy_beyond_what_the_output_type_needs(sdxl, monkeypatch):
    """Counts copies of image-sized tensors to the host (`.cpu()` and `.numpy()`, which copy
    on an accelerator and are no-ops here) and `.to()` to another device: the wrapper makes none
    beyond the bare pipeline's for the same output_type (no database: nothing to hash)."""
    tiny, moderated = sdxl
    pixels = 64 * 64
    counted = []
    originals = {name: getattr(torch.Tensor, name) for name in ("cpu", "numpy")}
    original_to = torch.Tensor.to

    def counting(name):
        def call(self, *args, **kwargs):
            if self.numel() >= pixels:
                counted.append(name)
            return originals[name](self, *args, **kwargs)

        return call

    def counting_to(self, *args, **kwargs):
        device = next((a for a in args if isinstance(a, (str, torch.device))), kwargs.get("device"))
        if device is not None and torch.device(device) != self.device and self.numel() >= pixels:
            counted.append("to")
        return original_to(self, *args, **kwargs)

    for name in originals:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    for output_type in ("pt", "np", "pil"):
        counted.clear()
        tiny.pipe(**tiny.call_args(output_type=output_type))
        bare = list(counted)
        counted.clear()
        moderated(**tiny.call_args(output_type=output_type))
        assert sorted(counted) == sorted(bare), output_type


@pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None,
    reason="enable_model_cpu_offload needs the accelerate package (pip install accelerate)",
)
def test_model_cpu_offload(tiny_clip_dir):
    """Offloading moves each model to the execution device for its turn (a CUDA device when
    there is one, else the CPU: diffusers' `device="cpu"`); the wrapper judges what comes out."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = build("sdxl")
    bare = tiny.pipe(**tiny.call_args(output_type="np")).images
    moderated = moderate_pipeline(tiny.pipe, one_concept_policy(tiny_clip_dir, 1.0), device=device)
    moderated.enable_model_cpu_offload(device=device)
    try:
        out = moderated(**tiny.call_args(output_type="np"))
        assert out.nsfw_content_detected == [False, False]
        np.testing.assert_allclose(out.images, bare, atol=1e-3)
        assert len(moderated.last_decisions) == 2
    finally:
        tiny.pipe.remove_all_hooks()
        tiny.pipe.to("cpu")


def test_a_video_with_a_non_finite_frame_is_an_error(tiny_clip_dir):
    from moderation.integrations.video import judge_videos

    moderator = Moderator.from_policy(one_concept_policy(tiny_clip_dir, 1.0))
    videos = torch.rand(2, 4, 3, 32, 48)  # 2 videos of 4 non-square frames: 2 views a frame
    videos[1, 2, 0, 0, 0] = float("nan")
    first, second = judge_videos(moderator, videos, [{}, {}], frame_batch=3).decisions
    assert (first.verdict, first.action) == ("allow", "allow")
    assert [v["frame"] for v in first.views] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert (second.verdict, second.action) == ("error", "blackout")
    assert second.metadata == {"frames": 4, "deciding_frame": 0}


def test_a_yaml_policy_and_a_compiled_artifact_work_too(tiny_clip_dir, tmp_path):
    """The policy as users pass it: a YAML file (compiled with its model) or an artifact."""
    tiny = build("flux")
    yaml = tmp_path / "policy.yaml"
    yaml.write_text(
        f"policy: yaml-test\nversion: 1\nmodel: {tiny_clip_dir}\n"
        "defaults: {threshold: -1.0}\n"  # fires on everything
        "concepts:\n  - name: anything\n    prompts: [a photo]\n    action: pixelate\n"
    )
    out = moderate_pipeline(tiny.pipe, yaml)(**tiny.call_args())
    assert [d.action for d in out.decisions] == ["pixelate", "pixelate"]
    assert out.decisions[0].policy.name == "yaml-test"
    artifact = tmp_path / "policy.safetensors"
    out.decisions[0].policy.save(artifact)
    again = moderate_pipeline(tiny.pipe, artifact, model=tiny_clip_dir)(**tiny.call_args())
    assert [d.action for d in again.decisions] == ["pixelate", "pixelate"]


def test_a_held_video_releases_its_deciding_frame(tiny_clip_dir, tmp_path):
    from moderation.review import ReviewQueue

    tiny = build("text-to-video")
    url = f"sqlite:///{tmp_path / 'log.db'}"
    moderated = moderate_pipeline(
        tiny.pipe,
        one_concept_policy(tiny_clip_dir, -1.0, "review"),
        db=url,
        held_dir=tmp_path / "held",
        spool_dir=tmp_path / "spool",
    )
    bare = tiny.pipe(**tiny.call_args(output_type="pt")).frames
    first = moderated(**tiny.call_args(output_type="pt")).decisions[0]
    queue = ReviewQueue(url)
    claim = next(c for c in queue.claim("alice", n=2) if c.decision_id == first.decision_id)
    queue.approve(claim.item_id, "alice", token=claim.token)
    png = moderated.release(first.decision_id)
    moderated.close()
    frame = bare[0, first.metadata["deciding_frame"]].permute(1, 2, 0).numpy()
    released = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32) / 255
    assert np.abs(released - frame).max() <= 1 / 255 + 1e-6
