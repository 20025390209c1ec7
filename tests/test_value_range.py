"""Reading a float image's value range: overshoot never flips it, a declared range always wins,
and an image that could be either is judged under both readings (the most severe wins)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moderation.chunks import split_call
from moderation.encoder import ClipEncoder
from moderation.engine import Moderator
from moderation.images import to_image_batch
from moderation.value_range import SIGNED_EVIDENCE
from policy import compile_policy, load_policy


def unit_image(seed: int = 0, size: int = 16) -> torch.Tensor:
    """A smooth [3,H,W] image in [0.1, 0.9]: room to overshoot either way."""
    torch.manual_seed(seed)
    base = torch.rand(1, 3, 4, 4)
    return 0.1 + 0.8 * torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear")[0]


def at(image: torch.Tensor, corner: int, value: float) -> torch.Tensor:
    """A copy with one pixel of the first channel set to `value` (corner 0: top left, 1: last)."""
    out = image.clone()
    out[0, -corner, -corner] = value
    return out


def as_kind(image: torch.Tensor, kind: str):
    """The same [3,H,W] image as the caller may pass it."""
    if kind == "tensor":
        return image[None]
    if kind == "numpy":
        return image.permute(1, 2, 0).numpy()[None]
    return [image]  # a list of one tensor: each list item decides for itself


KINDS = ["tensor", "numpy", "list"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("corner", [0, 1])
@pytest.mark.parametrize("dip", [-0.001, -0.2, -0.45])
def test_a_unit_image_that_dips_below_zero_is_not_flipped(kind, corner, dip):
    """Regression: one pixel of -0.001 read a [0,1] image as [-1,1], judged as (x+1)/2."""
    image = unit_image()
    batch = to_image_batch(as_kind(at(image, corner, dip), kind))
    assert batch.signed.tolist() == [False]  # shown as [0,1]: its pixels are judged as they are
    assert batch.ambiguous.tolist() == [True]  # ... and under [-1,1] too, to be safe
    torch.testing.assert_close(batch.images[0], at(image, corner, 0.0))
    torch.testing.assert_close(batch.alternate(0)[0], (at(image, corner, dip) + 1) / 2)
    assert batch.value_ranges() == ["both"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("corner", [0, 1])
@pytest.mark.parametrize(
    ("make", "value", "signed"),
    [
        (lambda x: x, 1.05, False),  # [0,1] overshooting above 1
        (lambda x: x, 1.4, False),
        (lambda x: x * 2 - 1, -1.22, True),  # [-1,1] overshooting below -1
        (lambda x: x * 2 - 1, 1.53, True),  # ... and above 1
        (lambda x: x * 2 - 1, -SIGNED_EVIDENCE, True),
    ],
)
def test_overshoot_at_either_end_keeps_the_range(kind, corner, make, value, signed):
    image = at(make(unit_image()), corner, value)
    batch = to_image_batch(as_kind(image, kind))
    assert batch.signed.tolist() == [signed] and batch.ambiguous.tolist() == [False]
    expected = ((image + 1) / 2 if signed else image).clamp(0, 1)
    torch.testing.assert_close(batch.images[0], expected)
    assert batch.value_ranges() == ["-1,1" if signed else "0,1"]
    assert batch.invalid.tolist() == [False]


@pytest.mark.parametrize("kind", KINDS)
def test_the_declared_range_always_wins(kind):
    dipped = at(unit_image(), 0, -0.3)
    unit = to_image_batch(as_kind(dipped, kind), value_range="0,1")
    assert unit.signed.tolist() == [False] and unit.ambiguous is None
    torch.testing.assert_close(unit.images[0], dipped.clamp(0, 1))
    bright = unit_image()  # a [-1,1] image with no negative value at all
    signed = to_image_batch(as_kind(bright, kind), value_range="-1,1")
    torch.testing.assert_close(signed.images[0], (bright + 1) / 2)
    assert (unit.value_ranges(), signed.value_ranges()) == (["0,1"], ["-1,1"])


def test_a_list_decides_per_item_and_a_batch_once():
    clean, dipped = unit_image(0), at(unit_image(1), 0, -0.01)
    listed = to_image_batch([clean, dipped, clean * 2 - 1])
    assert listed.value_ranges() == ["0,1", "both", "-1,1"]
    batched = to_image_batch(torch.stack([clean, dipped]))
    assert batched.value_ranges() == ["both", "both"]
    assert to_image_batch(torch.stack([clean, dipped]).to(torch.uint8)).value_ranges() == [
        None,
        None,
    ]


def test_nan_and_minus_inf_do_not_decide_the_range():
    image = unit_image()
    image[0, 0, 0], image[1, 0, 0] = float("nan"), float("-inf")
    batch = to_image_batch(image[None])
    assert batch.signed.tolist() == [False] and batch.ambiguous.tolist() == [False]


def test_a_split_batch_is_read_as_one_object():
    """Chunks of one batched tensor get the whole object's reading, not each their own."""
    images = torch.stack([unit_image(i, 32) for i in range(4)])
    images[3, 0, 0, 0] = -0.01  # the last image only: the whole batch is ambiguous
    chunks = split_call(images, "auto", "cover", 224, max_pixels=32 * 32)
    assert len(chunks) == 4
    readings = [to_image_batch(c.images, lowest=c.lowest).value_ranges()[0] for c in chunks]
    assert readings == ["both"] * 4
    arrays = images.permute(0, 2, 3, 1).numpy()
    chunks = split_call(arrays, "auto", "cover", 224, max_pixels=32 * 32)
    assert [to_image_batch(c.images, lowest=c.lowest).value_ranges()[0] for c in chunks] == [
        "both"
    ] * 4


# --- the engine judges both readings -------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir):
    return ClipEncoder.from_pretrained(tiny_clip_dir, device="cpu")


def policy_matching(tmp_path, encoder, image: torch.Tensor, value_range: str):
    """A policy whose one concept is `image`'s own embedding, read in `value_range`."""
    vector = encoder.embed_images(image[None], value_range=value_range)[0].float()
    text = ", ".join(f"{v:.8f}" for v in vector.tolist())
    path = tmp_path / "policy.yaml"
    path.write_text(
        "policy: range-test\nversion: 1\ndefaults: {threshold: 0.999}\nconcepts:\n"
        f"  - name: it\n    embedding: [{text}]\n    action: blackout\n"
    )
    return compile_policy(load_policy(path), encoder)


@pytest.mark.parametrize("kind", KINDS)
def test_one_negative_pixel_no_longer_lets_a_flagged_image_through(tmp_path, encoder, kind):
    """Regression: the same [0,1] image is flagged, but with one -0.001 pixel it was read as
    [-1,1], judged washed out, allowed and handed back unchanged."""
    image = unit_image(5, 64)
    moderator = Moderator(policy_matching(tmp_path, encoder, image, "0,1"), encoder)
    assert moderator.moderate(as_kind(image, kind)).decisions[0].action == "blackout"
    result = moderator.moderate(as_kind(at(image, 1, -0.001), kind))
    decision = result.decisions[0]
    assert (decision.action, decision.fired, decision.value_range) == ("blackout", ("it",), "both")
    # The views say which reading fired the concept: the [0,1] one.
    assert decision.views[decision.view_of(0)]["range"] == "0,1"
    assert {v["range"] for v in decision.views} == {"0,1", "-1,1"}
    out = result.images[0] if kind == "list" else result.images
    assert not np.asarray(out).any()  # blacked out in the caller's own form


def test_a_bright_signed_image_is_judged_as_signed_too(tmp_path, encoder):
    """The other reading: a [-1,1] image whose darkest pixel is -0.3 is caught as [-1,1]."""
    image = unit_image(6, 64) * 1.3 - 0.3  # [-0.17, 0.87]: could be either
    image[0, 0, 0] = -0.3
    moderator = Moderator(policy_matching(tmp_path, encoder, image, "-1,1"), encoder)
    decision = moderator.moderate(image[None]).decisions[0]
    assert (decision.action, decision.value_range) == ("blackout", "both")
    assert decision.views[decision.view_of(0)]["range"] == "-1,1"
    declared = moderator.moderate(image[None], value_range="0,1").decisions[0]
    assert (declared.action, declared.value_range) == ("allow", "0,1")
    assert ["range" in v for v in declared.views] == [False]  # one reading, one view


def test_unambiguous_images_cost_one_reading(tmp_path, encoder):
    image = unit_image(7, 64)
    moderator = Moderator(policy_matching(tmp_path, encoder, image, "0,1"), encoder)
    calls = []
    original = encoder.encode_image

    def counting(pixels):
        calls.append(pixels.shape[0])
        return original(pixels)

    moderator.encoder.encode_image = counting
    try:
        decisions = moderator.moderate(torch.stack([image, image * 2 - 1])).decisions
        assert [d.value_range for d in decisions] == ["-1,1", "-1,1"]
        assert calls == [2]
        moderator.moderate([image, at(image, 0, -0.01)])
        assert calls == [2, 3]  # the ambiguous one: two views
    finally:
        del moderator.encoder.encode_image
