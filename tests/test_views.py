"""Coverage (issue 8, item 1): by default every pixel of an image is seen by a square view; the
decision says which view fired; `views: tiles` adds tiles; `compat: diffusers` keeps the centre
crop; large calls are moderated in chunks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from moderation import chunks
from moderation.cli import main
from moderation.encoder import ClipEncoder
from moderation.engine import Moderator
from moderation.preprocess import (
    MAX_COVER_VIEWS,
    ViewError,
    clip_pixels,
    judged_views,
    plan_views,
    view_pixels,
)
from policy import CompiledPolicy, PolicyError, compile_policy, load_policy
from tests.test_images import chw, natural_image

# (H, W): 1:1, 2:3, 9:16 both ways, 1:3, nearly square, small, 16:1.
SIZES = [(512, 512), (768, 512), (512, 768), (1280, 720), (720, 1280), (1440, 480), (513, 512)]
SIZES += [(31, 17), (64, 1024), (225, 224)]


def covered(plan, height, width) -> np.ndarray:
    seen = np.zeros((height, width), bool)
    for left, top, right, bottom in plan.boxes:
        seen[top:bottom, left:right] = True
    return seen


@pytest.mark.parametrize(("height", "width"), SIZES)
@pytest.mark.parametrize("mode", ["cover", "tiles"])
def test_views_cover_every_pixel(height, width, mode):
    plan = plan_views(height, width, mode)
    assert covered(plan, height, width).all()
    for left, top, right, bottom in plan.boxes:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height


def test_the_centre_crop_misses_the_ends_of_a_tall_image():
    plan = plan_views(1440, 480, "center")
    assert plan.boxes == ((0, 480, 480, 960),)
    assert covered(plan, 1440, 480).mean() == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("height", "width", "cover", "tiles"),
    [
        (512, 512, 1, 10),  # 1:1: one view; tiles 3 x 3 more
        (768, 512, 2, 17),  # 2:3
        (1280, 720, 2, 23),  # 9:16
        (1440, 480, 3, 3 + 33),  # 1:3
        (513, 512, 1, 10),  # resizes to 224 x 224 exactly, as CLIP's own crop does
    ],
)
def test_view_counts(height, width, cover, tiles):
    assert len(plan_views(height, width, "cover")) == cover
    assert len(plan_views(width, height, "cover")) == cover
    assert len(plan_views(height, width, "tiles")) == tiles


def test_cover_views_are_evenly_spaced_and_flush_with_the_edges():
    assert plan_views(1440, 480, "cover").boxes == (
        (0, 0, 480, 480),
        (0, 480, 480, 960),
        (0, 960, 480, 1440),
    )
    assert plan_views(512, 768, "cover").boxes == ((0, 0, 512, 512), (256, 0, 768, 512))


def test_too_extreme_an_aspect_ratio_is_refused_not_judged_in_part():
    with pytest.raises(ViewError) as info:
        plan_views(10, 170, "cover")
    assert str(info.value) == (
        f"a 170x10 image needs 17 views to be seen whole, more than the {MAX_COVER_VIEWS} "
        f"allowed (aspect ratio beyond {MAX_COVER_VIEWS}:1)"
    )


def test_a_square_image_is_one_view_equal_to_the_centre_crop():
    x = chw(natural_image(300, 300))[None]
    assert torch.equal(view_pixels(x, plan_views(300, 300, "cover")), clip_pixels(x))
    u8 = (x * 255).round().to(torch.uint8)
    assert torch.equal(view_pixels(u8, plan_views(300, 300, "cover")), clip_pixels(u8))


def test_each_view_is_its_crop_resized_like_clip():
    x = chw(natural_image(400, 600, 2))[None]  # 2:3 landscape
    plan = plan_views(400, 600, "tiles")
    views = view_pixels(x, plan)
    for k, (left, top, right, bottom) in enumerate(plan.boxes):
        crop = clip_pixels(x[..., top:bottom, left:right])  # the same region on its own
        assert (views[k] - crop[0]).abs().mean() < 0.02, k  # filter support at crop edges


def test_views_of_a_batch_are_one_tensor_in_image_order():
    images = [
        chw(natural_image(h, w, i)) for i, (h, w) in enumerate([(64, 64), (96, 64), (64, 64)])
    ]
    invalid = torch.tensor([False, False, True])
    pixels, owners, descriptors, errors = judged_views(
        [(img[None], (0,)) for img in images], invalid, "cover"
    )
    assert pixels.shape == (4, 3, 224, 224) and owners.tolist() == [0, 1, 1, 2]
    assert torch.equal(pixels[0], clip_pixels(images[0])[0])
    assert torch.isnan(pixels[3]).all() and torch.isfinite(pixels[:3]).all()
    assert descriptors[1] == [
        {"frame": 0, "box": [0, 0, 64, 64]},
        {"frame": 0, "box": [0, 32, 64, 96]},
    ]
    assert errors == [None, None, None]


# --- the engine ---------------------------------------------------------------------------------


def tall_image() -> np.ndarray:
    """480 x 1440 (W x H): a picture in the top third, flat grey below it."""
    img = np.full((1440, 480, 3), 0.5, np.float32)
    img[:480] = natural_image(480, 480, 3)
    return img


def write_policy(tmp_path, model, vector, threshold, extra=""):
    values = ", ".join(f"{v:.8f}" for v in vector.tolist())
    path = tmp_path / "policy.yaml"
    path.write_text(
        f"policy: views-test\nmodel: {model}\n{extra}concepts:\n"
        f"  - name: top-content\n    embedding: [{values}]\n    threshold: {threshold}\n"
        "  - name: never\n    embedding: [" + ", ".join(["1.0"] * vector.numel()) + "]\n"
        "    threshold: 1\n"
    )
    return path


@pytest.fixture(scope="module")
def top_concept(encoder):
    """The embedding of the top third of tall_image(), and how close its centre crop comes."""
    x = chw(tall_image())[None]
    top = encoder.encode_image(clip_pixels(x[..., :480, :]))[0].float()
    centre = encoder.encode_image(clip_pixels(x))[0].float()
    cosine = float(torch.nn.functional.cosine_similarity(top, centre, dim=0))
    assert cosine < 0.95  # measured 0.81: the threshold below separates them
    return top, (1 + cosine) / 2


def test_content_in_the_top_third_of_a_tall_image_is_flagged(tmp_path, tiny_clip_dir, top_concept):
    # Regression (issue 8, item 1): the centre crop alone judged a 480x1440 image and allowed it.
    vector, threshold = top_concept
    image = chw(tall_image())
    default = Moderator.from_policy(write_policy(tmp_path, tiny_clip_dir, vector, threshold))
    assert default.policy.views == "cover"
    decision = default.moderate(image).decisions[0]
    assert decision.verdict == "flag" and decision.fired == ("top-content",)
    assert decision.views == [
        {"frame": 0, "box": [0, 0, 480, 480]},
        {"frame": 0, "box": [0, 480, 480, 960]},
        {"frame": 0, "box": [0, 960, 480, 1440]},
    ]
    assert decision.concept_views.tolist()[0] == 0  # the top view gave the cosine
    assert decision.embedding.shape == (3, vector.numel())
    row = decision.to_dict()["concepts"][0]
    # The decision document (CHANGELOG, issue 14): `name`, and `view` is {index, frame, box}.
    assert row["name"] == "top-content" and row["view"]["index"] == 0 and row["fired"]
    assert decision.to_dict()["views"] == decision.views

    centre_path = write_policy(tmp_path, tiny_clip_dir, vector, threshold, "views: center\n")
    centre = Moderator.from_policy(centre_path).moderate(image).decisions[0]
    assert centre.verdict == "allow" and centre.views is None
    assert centre.to_dict()["concepts"][0]["view"] is None


def test_check_json_says_which_view_fired(tmp_path, tiny_clip_dir, top_concept):
    vector, threshold = top_concept
    path = tmp_path / "tall.png"
    Image.fromarray((tall_image() * 255).round().astype(np.uint8)).save(path)
    policy = write_policy(tmp_path, tiny_clip_dir, vector, threshold)
    result = CliRunner().invoke(
        main, ["check", str(path), "--policy", str(policy), "--no-log", "--json"]
    )
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["verdict"] == "flag" and row["fired"] == ["top-content"]
    top = row["concepts"][0]
    assert top["name"] == "top-content" and top["view"]["index"] == 0
    assert row["views"][top["view"]["index"]] == {"frame": 0, "box": [0, 0, 480, 480]}


def test_tiles_catch_a_small_region_that_a_whole_view_dilutes(tmp_path, tiny_clip_dir, encoder):
    big = np.full((896, 896, 3), 0.5, np.float32)
    big[:224, :224] = natural_image(224, 224, 5)  # a small picture in a corner of a grey one
    x = chw(big)[None]
    tiles = view_pixels(x, plan_views(896, 896, "tiles"))  # view 1: the top-left tile
    vector = encoder.encode_image(tiles[1:2])[0].float()
    whole = encoder.encode_image(clip_pixels(x))[0].float()
    cosine = float(torch.nn.functional.cosine_similarity(vector, whole, dim=0))
    assert cosine < 0.999  # measured 0.993 (random tiny weights see little); the tile has 1.0
    threshold = (1 + cosine) / 2
    cover = Moderator.from_policy(write_policy(tmp_path, tiny_clip_dir, vector, threshold))
    assert cover.moderate(x).decisions[0].verdict == "allow"
    tiled = Moderator.from_policy(
        write_policy(tmp_path, tiny_clip_dir, vector, threshold, "views: tiles\n")
    )
    decision = tiled.moderate(x).decisions[0]
    assert decision.verdict == "flag" and len(decision.views) == 10
    assert decision.views[decision.concept_views[0]] == {"frame": 0, "box": [0, 0, 448, 448]}


def test_an_image_too_extreme_to_cover_fails_closed(tmp_path, tiny_clip_dir, top_concept):
    vector, threshold = top_concept
    moderator = Moderator.from_policy(write_policy(tmp_path, tiny_clip_dir, vector, threshold))
    banner, fine = torch.rand(3, 10, 200), torch.rand(3, 64, 64)
    first, second = moderator.moderate([banner, fine]).decisions
    assert first.verdict == "error" and first.action == "blackout"
    assert first.error == (
        "a 200x10 image needs 20 views to be seen whole, more than the 16 allowed "
        "(aspect ratio beyond 16:1)"
    )
    assert second.verdict != "error" and second.error is None


def test_views_of_every_image_go_through_one_forward(tmp_path, tiny_clip_dir, top_concept):
    vector, threshold = top_concept
    moderator = Moderator.from_policy(write_policy(tmp_path, tiny_clip_dir, vector, threshold))
    calls = []
    encode = moderator.encoder.encode_image
    moderator.encoder.encode_image = lambda pixels: calls.append(pixels.shape[0]) or encode(pixels)
    images = [chw(tall_image()), torch.rand(3, 64, 64), torch.rand(3, 64, 96)]
    decisions = moderator.moderate(images).decisions
    assert calls == [3 + 1 + 2]
    assert [len(d.views) for d in decisions] == [3, 1, 2]


# --- the policy key -----------------------------------------------------------------------------


def test_compat_diffusers_keeps_the_centre_crop_and_refuses_cover(tmp_path, tiny_clip_dir):
    base = f"policy: p\nmodel: {tiny_clip_dir}\ncompat: diffusers\n"
    concepts = "concepts:\n  - name: c\n    embedding: [" + ", ".join(["1.0"] * 32) + "]\n"
    path = tmp_path / "compat.yaml"
    path.write_text(base + concepts)
    encoder = ClipEncoder.from_pretrained(tiny_clip_dir, device="cpu")
    assert compile_policy(load_policy(path), encoder).views == "center"
    path.write_text(base + "views: cover\n" + concepts)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value).startswith(
        f"{path}:4:8 views: must be 'center' when compat is 'diffusers': diffusers' checker "
        "judges CLIP's single centre crop (drop compat to judge every pixel)"
    )
    path.write_text(base + "views: center\n" + concepts)
    assert compile_policy(load_policy(path), encoder).views == "center"
    path.write_text(f"policy: p\nmodel: {tiny_clip_dir}\nviews: everything\n" + concepts)
    with pytest.raises(PolicyError, match=r":3:8 views: "):
        load_policy(path)


def test_views_are_in_the_digest_and_the_artifact(tmp_path, tiny_clip_dir, encoder, top_concept):
    vector, threshold = top_concept
    digests = {}
    for mode in ("cover", "center", "tiles"):
        path = write_policy(tmp_path, tiny_clip_dir, vector, threshold, f"views: {mode}\n")
        compiled = compile_policy(load_policy(path), encoder)
        loaded = CompiledPolicy.load(compiled.save(tmp_path / f"{mode}.safetensors"))
        assert loaded.views == mode and loaded.digest == compiled.digest
        digests[mode] = compiled.digest
    assert len(set(digests.values())) == 3
    default = compile_policy(
        load_policy(write_policy(tmp_path, tiny_clip_dir, vector, 0.5)), encoder
    )
    assert default.views == "cover"
    with pytest.raises(
        PolicyError, match="views must be one of 'cover', 'center', 'tiles', got 'all'"
    ):
        CompiledPolicy(**{**_fields(default), "views": "all", "digest": ""})


def _fields(policy: CompiledPolicy) -> dict:
    import dataclasses

    return {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)}


# --- chunks -------------------------------------------------------------------------------------


def test_a_large_call_is_moderated_in_chunks_with_the_same_results(
    monkeypatch, tmp_path, tiny_clip_dir, top_concept
):
    vector, threshold = top_concept
    moderator = Moderator.from_policy(write_policy(tmp_path, tiny_clip_dir, vector, threshold))
    torch.manual_seed(3)
    batch = torch.rand(5, 3, 96, 64) * 2 - 1  # [-1,1] ...
    batch[4] = batch[4].abs()  # ... and one image without a negative value
    whole = moderator.moderate(batch)
    calls = []
    encode = moderator.encoder.encode_image
    moderator.encoder.encode_image = lambda pixels: calls.append(pixels.shape[0]) or encode(pixels)
    monkeypatch.setattr(chunks, "CHUNK_PIXELS", 2 * 96 * 64)  # two images a chunk
    split = moderator.moderate(batch)
    assert calls == [4, 4, 2]  # two views each
    assert torch.equal(split.images, whole.images) and split.images.shape == batch.shape
    # The whole batch's range decision holds in its last chunk too.
    for a, b in zip(split.decisions, whole.decisions, strict=True):
        assert a.verdict == b.verdict
        np.testing.assert_allclose(a.cosines, b.cosines, atol=1e-5)
    lists = moderator.moderate(list(batch.unbind(0)), metadata=[{"i": i} for i in range(5)])
    assert [d.metadata["i"] for d in lists.decisions] == list(range(5))
    assert isinstance(lists.images, list) and len(lists.images) == 5
