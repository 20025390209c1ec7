"""ThreeValueSafetyChecker in the slot of DeepFloyd IF and the Stable Diffusion upscaler."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor

from moderation.integrations.three_value import ThreeValueSafetyChecker
from moderation.synthetic import build_safety_checker
from tests.pipelines_factory import deepfloyd_if, identical, one_concept_policy, upscaler

BUILD = {"deepfloyd-if": deepfloyd_if, "sd-upscaler": upscaler}


@pytest.fixture(scope="module")
def tower():
    return build_safety_checker(seed=1)  # its vision tower is the checker's encoder


def checker(tower, threshold, **kwargs):
    policy = one_concept_policy("tiny", threshold, "blur")
    return ThreeValueSafetyChecker.from_checker(tower, policy, **kwargs)


@pytest.fixture(scope="module")
def pipelines():
    """Per family: the bare pipeline and one whose slot holds our checker (swapped per test)."""
    out = {}
    for name, make in BUILD.items():
        bare = make()
        slotted = make(safety_checker=None, feature_extractor=CLIPImageProcessor())
        for p in (bare.pipe, slotted.pipe):
            p.set_progress_bar_config(disable=True)
        out[name] = (bare, slotted)
    return out


def flags(output):
    """IF's output says nsfw_detected, the upscaler's nsfw_content_detected."""
    found = getattr(output, "nsfw_detected", None)
    return list(found if found is not None else output.nsfw_content_detected)


def test_it_returns_images_nsfw_and_no_watermark_verdict(tower):
    ours = checker(tower, -1.0)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    moderated, nsfw, watermark = ours(images=images, clip_input=torch.rand(2, 3, 224, 224))
    assert nsfw == [True, True] and watermark is None
    assert moderated.shape == images.shape
    assert [d.action for d in ours.last_decisions] == ["blur", "blur"]


@pytest.mark.parametrize("output_type", ["pil", "np"])
@pytest.mark.parametrize("name", list(BUILD))
def test_allowing_everything_changes_nothing(pipelines, tower, name, output_type):
    bare, slotted = pipelines[name]
    slotted.pipe.safety_checker = checker(tower, 1.0)
    want = bare.pipe(**bare.call_args(output_type=output_type))
    got = slotted.pipe(**slotted.call_args(output_type=output_type))
    assert identical(got.images, want.images)
    assert flags(got) == [False, False]
    assert getattr(got, "watermark_detected", None) is None


@pytest.mark.parametrize("output_type", ["pil", "np"])
@pytest.mark.parametrize("name", list(BUILD))
def test_flagging_everything_acts_on_every_image(pipelines, tower, name, output_type):
    bare, slotted = pipelines[name]
    ours = checker(tower, -1.0)
    slotted.pipe.safety_checker = ours
    want = bare.pipe(**bare.call_args(output_type=output_type)).images
    got = slotted.pipe(**slotted.call_args(output_type=output_type))
    assert flags(got) == [True, True]
    assert [d.action for d in ours.last_decisions] == ["blur", "blur"]
    for i in range(2):
        assert not identical(got.images[i], want[i])
        assert np.asarray(got.images[i]).std() > 0  # blurred, not blacked out


@pytest.mark.parametrize("name", list(BUILD))
def test_every_image_is_logged_and_a_broken_encoder_fails_closed(
    pipelines, tower, tmp_path, name, monkeypatch
):
    _, slotted = pipelines[name]
    url = f"sqlite:///{tmp_path / 'log.db'}"
    ours = checker(tower, 1.0, db=url, held_dir=tmp_path / "held", spool_dir=tmp_path / "spool")
    slotted.pipe.safety_checker = ours
    slotted.pipe(**slotted.call_args(output_type="np"))
    logged = [d.decision_id for d in ours.last_decisions]

    def broken(pixel_values):
        raise RuntimeError("the encoder is broken")

    monkeypatch.setattr(ours.encoder, "encode_image", broken)
    out = slotted.pipe(**slotted.call_args(output_type="np"))
    ours.close()
    assert flags(out) == [True, True]
    assert {d.verdict for d in ours.last_decisions} == {"error"}
    assert np.all(out.images == 0)  # on_error: blackout
    with sqlite3.connect(tmp_path / "log.db") as db:
        rows = dict(db.execute("SELECT id, verdict FROM decisions").fetchall())
    assert len(rows) == 4
    assert {rows[i] for i in logged} == {"allow"}
    assert {rows[d.decision_id] for d in ours.last_decisions} == {"error"}


def test_it_saves_and_loads_with_its_pipeline(tower, tmp_path):
    from diffusers import IFPipeline

    ours = checker(tower, -1.0)
    tiny = deepfloyd_if(safety_checker=ours, feature_extractor=CLIPImageProcessor())
    tiny.pipe.save_pretrained(tmp_path)
    loaded = IFPipeline.from_pretrained(tmp_path)
    assert type(loaded.safety_checker) is ThreeValueSafetyChecker
    assert loaded.safety_checker.policy.digest == ours.policy.digest
    loaded.set_progress_bar_config(disable=True)
    out = loaded(**tiny.call_args(output_type="np"))
    assert list(out.nsfw_detected) == [True, True] and out.watermark_detected is None
