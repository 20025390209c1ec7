"""Animations (issue 8, item 2): every frame is judged (or a bounded sample that is never only
the first and never skips a long frame), the most severe frame decides, and `check --out` never
re-animates a frame that was not judged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from moderation import image_files
from moderation.cli import main
from moderation.engine import Moderator
from moderation.image_files import LONG_FRAME_MS, ImageInputError, read_image, sample_frames
from moderation.preprocess import clip_pixels
from tests.test_images import natural_image


def frames_of(n: int, size: int = 48) -> list[Image.Image]:
    return [
        Image.fromarray((natural_image(size, size, seed) * 255).round().astype(np.uint8))
        for seed in range(n)
    ]


def save_animation(path, frames, durations):
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path


# --- which frames are judged --------------------------------------------------------------------


def test_every_frame_of_a_short_animation_is_judged():
    assert sample_frames([100] * 10, 32) == list(range(10))


def test_a_long_animation_is_sampled_never_only_its_first_frame():
    chosen = sample_frames([100] * 1000, 32)
    assert len(chosen) == 32 and chosen[0] == 0 and chosen[-1] == 999
    assert max(np.diff(chosen)) <= 40  # spread over the whole loop


def test_a_frame_shown_long_is_never_skipped():
    durations = [20] * 500
    durations[321] = 10_000  # ten seconds of one frame among 500 quick ones
    assert 321 in sample_frames(durations, 32)
    durations = [2000] * 40 + [30] * 460  # many long frames: every one of them
    chosen = sample_frames(durations, 32)
    assert set(range(40)) <= set(chosen)


@pytest.mark.parametrize("seed", range(5))
def test_a_frame_on_screen_for_a_thirtieth_of_the_loop_is_judged(seed):
    rng = np.random.default_rng(seed)
    durations = rng.integers(0, 900, 300).tolist()
    chosen = set(sample_frames(durations, 32))
    shown = [100 if d <= 10 else d for d in durations]  # browsers' clock for 0-10 ms frames
    assert all(n in chosen for n, d in enumerate(shown) if d >= sum(shown) / 30)


def test_too_many_long_frames_refuse_the_animation(tmp_path):
    path = save_animation(tmp_path / "long.gif", frames_of(140, 8), [LONG_FRAME_MS] * 140)
    with Image.open(path) as image:
        assert image.n_frames == 140
    with pytest.raises(ImageInputError) as info:
        read_image(path)
    assert str(info.value) == (
        f"{path}: 140 of its 140 frames must be judged (a frame shown for 1000 ms or more is "
        "never skipped), more than the 128 allowed"
    )


@pytest.mark.parametrize("suffix", [".gif", ".png", ".webp"])
def test_frames_are_decoded_from_gif_apng_and_webp(tmp_path, suffix):
    path = save_animation(tmp_path / f"a{suffix}", frames_of(5), [100, 200, 300, 400, 500])
    file = read_image(path)
    assert file.animated and file.frame_count == 5 and file.frame_numbers == (0, 1, 2, 3, 4)
    assert file.frames.shape == (5, 3, 48, 48) and file.frames.dtype == torch.uint8
    assert file.durations_ms == (100, 200, 300, 400, 500)
    assert not torch.equal(file.frames[0], file.frames[3])


def test_judged_frames_share_a_pixel_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(image_files, "FRAME_PIXELS", 5 * 24 * 24)
    file = read_image(save_animation(tmp_path / "a.gif", frames_of(5), [100] * 5))
    assert file.size == (24, 24) and file.reduced == 2


# --- judged by the engine -----------------------------------------------------------------------


@pytest.fixture
def animation(tmp_path):
    """A 6-frame GIF whose frame 3 holds what the policy flags, and its policy."""
    path = save_animation(tmp_path / "anim.gif", frames_of(6), [100] * 6)
    return path


def flagging_policy(tmp_path, tiny_clip_dir, encoder, path, frame, extra=""):
    """A policy with one concept: the decoded frame `frame`'s own embedding."""
    frames = read_image(path).frames
    embeddings = encoder.encode_image(clip_pixels(frames)).float()  # [F, D]
    unit = torch.nn.functional.normalize(embeddings)
    others = [i for i in range(len(frames)) if i != frame]
    threshold = (1 + float((unit[others] @ unit[frame]).max())) / 2
    values = ", ".join(f"{v:.8f}" for v in embeddings[frame].tolist())
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"policy: frames\nmodel: {tiny_clip_dir}\n{extra}concepts:\n"
        f"  - name: frame-content\n    embedding: [{values}]\n    threshold: {threshold:.6f}\n"
    )
    return policy


@pytest.mark.parametrize("views", ["", "views: center\n"])
def test_the_most_severe_frame_decides(tmp_path, tiny_clip_dir, encoder, animation, views):
    # Regression (issue 8, item 2): only frame 0 was judged.
    policy = flagging_policy(tmp_path, tiny_clip_dir, encoder, animation, 3, views)
    moderator = Moderator.from_policy(policy)
    decision = moderator.moderate(animation).decisions[0]
    assert decision.verdict == "flag" and decision.fired == ("frame-content",)
    assert [v["frame"] for v in decision.views] == [0, 1, 2, 3, 4, 5]
    assert decision.views[decision.concept_views[0]] == {"frame": 3, "box": [0, 0, 48, 48]}
    first = read_image(animation).frames[0]  # the first frame alone is allowed
    assert moderator.moderate(first).decisions[0].verdict == "allow"


def test_check_out_writes_a_still_of_a_flagged_animation(
    tmp_path, tiny_clip_dir, encoder, animation
):
    policy = flagging_policy(tmp_path, tiny_clip_dir, encoder, animation, 3)
    out = tmp_path / "out"
    args = [
        "check",
        str(animation),
        "--policy",
        str(policy),
        "--no-log",
        "--json",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert (
        row["verdict"] == "flag" and row["views"][row["concepts"][0]["view"]["index"]]["frame"] == 3
    )
    with Image.open(out / f"{animation.name}.png") as written:  # check keeps the input name
        assert not getattr(written, "is_animated", False)  # blacked out, and still
        assert np.asarray(written.convert("RGB")).max() == 0


def test_check_out_re_animates_only_judged_frames(tmp_path, tiny_clip_dir, encoder, monkeypatch):
    durations = [100] * 40
    durations[17] = 5000
    path = save_animation(tmp_path / "long.gif", frames_of(40, 16), durations)
    monkeypatch.setattr(image_files, "MAX_FRAMES", 8)
    judged = read_image(path)
    assert len(judged.frame_numbers) == 8 and 17 in judged.frame_numbers
    policy = tmp_path / "allow.yaml"
    policy.write_text(
        f"policy: none\nmodel: {tiny_clip_dir}\nconcepts:\n"
        "  - name: never\n    embedding: [" + ", ".join(["1.0"] * 32) + "]\n    threshold: 1\n"
    )
    out = tmp_path / "out"
    args = ["check", str(path), "--policy", str(policy), "--no-log", "--json", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert [v["frame"] for v in row["views"]] == list(judged.frame_numbers)
    with Image.open(out / "long.gif.png") as written:  # check keeps the input name
        assert written.n_frames == 8
        shown = []
        for i in range(written.n_frames):
            written.seek(i)
            shown.append(written.info["duration"])
            frame = np.asarray(written.convert("RGB"))
            assert np.array_equal(frame, judged.frames[i].permute(1, 2, 0).numpy())
        assert sum(shown) == sum(durations)  # the loop keeps its length
