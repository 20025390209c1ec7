"""Previews judged before they are shown, logged and linked to their call."""

from __future__ import annotations

import sqlite3

import torch

from moderation.integrations.diffusers import moderate_pipeline
from moderation.integrations.previews import moderate_preview, preview_callback
from tests.pipelines_factory import build, one_concept_policy


def test_previews_are_judged_logged_and_linked_to_the_call(tiny_clip_dir, tmp_path):
    tiny = build("sdxl")
    url = f"sqlite:///{tmp_path / 'log.db'}"
    moderated = moderate_pipeline(
        tiny.pipe,
        one_concept_policy(tiny_clip_dir, -1.0, "blackout"),
        db=url,
        held_dir=tmp_path / "held",
        spool_dir=tmp_path / "spool",
    )
    shown = []
    callback = preview_callback(moderated, lambda images, d, step: shown.append((step, images, d)))
    out = moderated(**tiny.call_args(output_type="pt"), callback_on_step_end=callback)
    moderated.close()
    assert [step for step, _, _ in shown] == [0, 1]
    for _, images, decisions in shown:
        assert images.shape == (2, 3, 64, 64) and torch.all(images == 0)  # acted before shown
        assert [d.metadata["preview"] for d in decisions] == [True, True]
        assert {d.metadata["call_id"] for d in decisions} == {out.decisions[0].metadata["call_id"]}
    with sqlite3.connect(tmp_path / "log.db") as db:
        (count,) = db.execute("SELECT count(*) FROM decisions").fetchone()
    assert count == 2 * 2 + 2  # two previews of two images, then the two outputs


def test_a_preview_that_cannot_be_judged_is_black(tiny_clip_dir, monkeypatch):
    tiny = build("sdxl")
    moderated = moderate_pipeline(tiny.pipe, one_concept_policy(tiny_clip_dir, 1.0))

    def broken(pixel_values):
        raise RuntimeError("the encoder is broken")

    monkeypatch.setattr(moderated.moderator.encoder, "encode_image", broken)
    images, decisions = moderate_preview(moderated, torch.rand(2, 3, 32, 32), step=3)
    assert torch.all(images == 0)
    assert {d.verdict for d in decisions} == {"error"}
    assert decisions[0].metadata["step"] == 3
