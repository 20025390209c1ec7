"""moderate_pipeline on tiny pipelines of every tested family: image, video and three-value."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from moderation.integrations.diffusers import moderate_pipeline
from tests.pipelines_factory import (
    BUILDERS,
    build,
    identical,
    one_concept_policy,
    outputs_of,
)

FAMILIES = [name for name in BUILDERS if name != "ldm3d"]  # LDM3D: the slot (test_ldm3d_slot)
OUTPUT_TYPES = ("pil", "np", "pt")


@pytest.fixture(scope="module")
def wrapped(tiny_clip_dir):
    """Per family: the tiny pipeline, and it wrapped with allow-everything and flag-everything."""
    cache = {}

    def get(name):
        if name not in cache:
            tiny = build(name)
            allow = moderate_pipeline(tiny.pipe, one_concept_policy(tiny_clip_dir, 1.0))
            flag = moderate_pipeline(tiny.pipe, one_concept_policy(tiny_clip_dir, -1.0))
            cache[name] = (tiny, allow, flag)
        return cache[name]

    return get


@pytest.mark.parametrize("output_type", OUTPUT_TYPES)
@pytest.mark.parametrize("name", FAMILIES)
def test_allowing_everything_returns_the_bare_pipelines_output(wrapped, name, output_type):
    tiny, allow, _ = wrapped(name)
    bare = tiny.pipe(**tiny.call_args(output_type=output_type))
    ours = allow(**tiny.call_args(output_type=output_type))
    assert type(ours) is type(bare)
    assert identical(outputs_of(ours), outputs_of(bare))  # same type, pixel for pixel
    assert ours.nsfw_content_detected == [False] * tiny.images_per_call
    assert [d.action for d in ours.decisions] == ["allow"] * tiny.images_per_call
    assert allow.last_decisions == ours.decisions


@pytest.mark.parametrize("output_type", OUTPUT_TYPES)
@pytest.mark.parametrize("name", FAMILIES)
def test_flagging_everything_acts_on_every_output(wrapped, name, output_type):
    tiny, _, flag = wrapped(name)
    bare = outputs_of(tiny.pipe(**tiny.call_args(output_type=output_type)))
    ours = flag(**tiny.call_args(output_type=output_type))
    assert ours.nsfw_content_detected == [True] * tiny.images_per_call
    assert [d.action for d in ours.decisions] == ["blur"] * tiny.images_per_call
    assert [d.fired for d in ours.decisions] == [("anything",)] * tiny.images_per_call
    moderated = outputs_of(ours)
    assert type(moderated) is type(bare)
    for i in range(tiny.images_per_call):  # every image (every video) was changed
        assert not identical(moderated[i], bare[i]), f"output {i} was not acted on"


@pytest.mark.parametrize("name", FAMILIES)
def test_every_output_is_one_logged_decision(tiny_clip_dir, tmp_path, name):
    tiny = build(name)
    url = f"sqlite:///{tmp_path / 'log.db'}"
    moderated = moderate_pipeline(
        tiny.pipe,
        one_concept_policy(tiny_clip_dir, -1.0),
        db=url,
        held_dir=tmp_path / "held",
        spool_dir=tmp_path / "spool",
    )
    with moderated.caller(user="u1", seed=0):
        out = moderated(**tiny.call_args(output_type="pt"))
    moderated.close()
    assert moderated.last_unrecorded == []
    with sqlite3.connect(tmp_path / "log.db") as db:
        rows = db.execute("SELECT id, action FROM decisions ORDER BY id").fetchall()
    assert sorted(r[0] for r in rows) == sorted(d.decision_id for d in out.decisions)
    assert {r[1] for r in rows} == {"blur"}
    meta = out.decisions[0].metadata
    assert meta["user"] == "u1" and meta["seed"] == 0
    assert meta["pipeline"] == type(tiny.pipe).__name__
    if "prompt" in tiny.inputs:  # the call's prompt is logged by default
        prompt = tiny.inputs["prompt"]
        assert meta["prompt"] == (prompt if isinstance(prompt, str) else prompt[0])
    if tiny.kind == "video":
        assert meta["frames"] == tiny.inputs["num_frames"]
        assert 0 <= meta["deciding_frame"] < meta["frames"]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_failing_encoder_fails_closed(wrapped, name, monkeypatch):
    tiny, allow, _ = wrapped(name)

    def broken(pixel_values):
        raise RuntimeError("the encoder is broken")

    monkeypatch.setattr(allow.moderator.encoder, "encode_image", broken)
    out = allow(**tiny.call_args(output_type="pt"))
    assert out.nsfw_content_detected == [True] * tiny.images_per_call
    assert {d.verdict for d in out.decisions} == {"error"}
    assert {d.action for d in out.decisions} == {"blackout"}  # the policy's on_error
    assert all("the encoder is broken" in d.error for d in out.decisions)
    black = -1.0 if name == "deepfloyd-if" else 0.0  # IF's "pt" output is in [-1, 1]
    assert torch.all(outputs_of(out) == black)
