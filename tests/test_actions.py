"""Image actions: blackout, blur, pixelate, review placeholder, batched dispatch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from moderation.actions import (
    ActionError,
    _separable_gaussian,
    apply_actions,
    blackout,
    gaussian_blur,
    pixelate,
)
from moderation.errors import ModerationError


def natural(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """[3,H,W] float [0,1]: gradients, a disc and noise."""
    gen = torch.Generator().manual_seed(seed)
    yy = torch.linspace(0, 1, height).view(-1, 1).expand(height, width)
    xx = torch.linspace(0, 1, width).view(1, -1).expand(height, width)
    img = torch.stack([0.2 + 0.6 * xx, 0.3 + 0.5 * yy, 0.5 + 0.4 * torch.sin(6 * xx + 3 * yy)])
    disc = (yy - 0.45) ** 2 + (xx - 0.4) ** 2 < 0.04
    img = torch.where(disc, torch.tensor([0.9, 0.2, 0.1]).view(3, 1, 1), img)
    return (img + 0.03 * torch.randn(img.shape, generator=gen)).clamp(0, 1)


def checkerboard(height: int, width: int) -> torch.Tensor:
    """[3,H,W] one-pixel black/white checkerboard."""
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return ((yy + xx) % 2).float().expand(3, height, width).clone()


def test_blackout_gives_zeros():
    x = torch.rand(2, 3, 7, 5)
    out = blackout(x)
    assert torch.equal(out, torch.zeros_like(x)) and out.dtype == x.dtype


@pytest.mark.parametrize("radius", [2, 5, 24])
@pytest.mark.parametrize("size", [(64, 64), (37, 53)])
def test_blur_removes_checkerboard(radius, size):
    board = checkerboard(*size)
    out = gaussian_blur(board, radius)
    assert out.shape == board.shape
    assert out.var() < 0.05 * board.var()
    torch.testing.assert_close(out.mean(), board.mean(), atol=0.02, rtol=0)


@pytest.mark.parametrize("radius", [1.5, 4, 8, 24, 80])
def test_blur_keeps_a_flat_colour(radius):
    flat = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1).expand(2, 3, 45, 61).clone()
    torch.testing.assert_close(gaussian_blur(flat, radius), flat, atol=1e-5, rtol=0)


@pytest.mark.parametrize("radius", [8, 24])
def test_fast_blur_matches_exact_gaussian(radius):
    # Large radii blur a downsampled copy; it must stay close to the full-resolution Gaussian.
    img = natural(256, 320)[None]
    exact = _separable_gaussian(img, float(radius))
    diff = (gaussian_blur(img, radius) - exact).abs()
    assert diff.mean() < 0.5 / 255, float(diff.mean() * 255)  # measured 0.04 / 0.21


@pytest.mark.parametrize("radius", [2, 24])
def test_blur_radius_means_what_pil_means(radius):
    img = natural(256, 256)
    u8 = (img * 255).round().byte().permute(1, 2, 0).numpy()
    pil = np.asarray(Image.fromarray(u8).filter(ImageFilter.GaussianBlur(radius)))
    pil_t = torch.from_numpy(pil.astype(np.float32) / 255).permute(2, 0, 1)
    inner = slice(3 * radius, -3 * radius)  # PIL's edge handling differs from reflect padding
    diff = (gaussian_blur(img, radius) - pil_t)[:, inner, inner].abs().mean()
    assert diff < 1.5 / 255, float(diff * 255)  # measured 0.3 / 0.5 (PIL uses box passes)


def test_blur_radius_zero_and_tiny_images():
    x = torch.rand(3, 5, 4)
    assert torch.equal(gaussian_blur(x, 0), x)
    out = gaussian_blur(torch.rand(1, 3, 2, 3), 3)  # pad wider than the image
    assert out.shape == (1, 3, 2, 3) and torch.isfinite(out).all()
    assert gaussian_blur(torch.rand(1, 3, 1, 1), 24).shape == (1, 3, 1, 1)


@pytest.mark.parametrize(("height", "width", "block"), [(64, 64, 16), (37, 50, 16), (5, 3, 8)])
def test_pixelate_makes_blocks_constant(height, width, block):
    x = torch.rand(2, 3, height, width)
    out = pixelate(x, block)
    assert out.shape == x.shape
    bh, bw = min(block, height), min(block, width)
    for top in range(0, height, bh):
        for left in range(0, width, bw):
            tile = out[..., top : top + bh, left : left + bw]
            expected = x[..., top : top + bh, left : left + bw].mean(dim=(-2, -1), keepdim=True)
            torch.testing.assert_close(tile, expected.expand_as(tile))


def test_pixelate_block_one_is_identity():
    x = torch.rand(3, 6, 6)
    assert torch.equal(pixelate(x, 1), x)


def test_allow_is_bit_identical_and_input_untouched():
    x = torch.rand(3, 3, 16, 16)
    before = x.clone()
    out = apply_actions(x, ["allow", "blur", "allow"])
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert torch.equal(x, before) and out.data_ptr() != x.data_ptr()
    everything = apply_actions(x, ["allow"] * 3)
    assert torch.equal(everything, x) and everything.data_ptr() != x.data_ptr()


def test_mixed_actions_in_one_batch():
    x = torch.stack([natural(40, 30, i) for i in range(6)])
    actions = ["allow", "review", "blur", "pixelate", "blackout", "blur"]
    # Strengths are fractions of the shorter side (30 px): sigma 6 px, blocks of 8 px.
    out = apply_actions(x, actions, blur_radius=0.2, pixelate_block=0.27)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out[0], x[0])
    blurred = gaussian_blur(x[[1, 2, 5]], 6)  # review shows the blur placeholder
    torch.testing.assert_close(out[[1, 2, 5]], blurred)
    torch.testing.assert_close(out[3], pixelate(x[3], 8))
    assert torch.equal(out[4], torch.zeros_like(x[4]))


@pytest.mark.parametrize("placeholder", ["blackout", "pixelate", "blur"])
def test_review_placeholder(placeholder):
    x = torch.rand(2, 3, 9, 9)
    out = apply_actions(x, ["review", "allow"], review_placeholder=placeholder, pixelate_block=0.45)
    expected = {
        "blackout": blackout(x[0]),
        "pixelate": pixelate(x[0], 4),
        "blur": gaussian_blur(x[0], 1.0),  # the 1-pixel floor of 0.05 x 9 px
    }
    torch.testing.assert_close(out[0], expected[placeholder])


@pytest.mark.parametrize("images", [torch.rand(2, 3, 9, 9), [torch.rand(3, 9, 9)] * 2])
@pytest.mark.parametrize("placeholder", ["allow", "review", "none", ""])
def test_review_placeholder_must_hide_the_image(images, placeholder):
    """An image held for review never goes back as it is, whatever the caller or a hand-built
    policy says (the vocabulary's PLACEHOLDERS, the same list the schema and compiled rules use)."""
    with pytest.raises(ActionError, match="review placeholder .* is not one of blur, pixelate"):
        apply_actions(images, ["review", "allow"], review_placeholder=placeholder)


def test_one_vocabulary_for_every_layer():
    import typing

    from policy import compiled_rules, schema, vocabulary

    assert vocabulary.PLACEHOLDERS == ("blur", "pixelate", "blackout")
    assert "allow" not in vocabulary.PLACEHOLDERS and "allow" not in vocabulary.FAIL_CLOSED
    assert typing.get_args(schema.ReviewSettings.model_fields["placeholder"].annotation) == (
        vocabulary.PLACEHOLDERS
    )
    assert compiled_rules.PLACEHOLDERS is vocabulary.PLACEHOLDERS
    assert list(vocabulary.ACTION_RANK) == list(vocabulary.ACTIONS)


def test_no_layer_writes_a_vocabulary_of_its_own():
    """Regression: actions.py had its own PLACEHOLDERS (with `allow`), the schema, the compiled
    rules, review and the decision log theirs. A tuple, list or set literal holding exactly the
    names of a vocabulary is a copy of it (the benchmarks' choices of what to time aside)."""
    import ast
    from pathlib import Path

    from policy import vocabulary

    names = ("ACTIONS", "PLACEHOLDERS", "FAIL_CLOSED", "VERDICTS", "VIEWS", "REVIEW_STATUSES")
    vocabularies = {frozenset(getattr(vocabulary, n)): n for n in (*names, "DECIDED")}
    root = Path(vocabulary.__file__).parent.parent
    copies = []
    for path in sorted([*root.glob("policy/**/*.py"), *root.glob("moderation/**/*.py")]):
        if path.name == "vocabulary.py" or "bench" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
            ):
                found = vocabularies.get(frozenset(e.value for e in node.elts))
                if found and len(node.elts) > 1:
                    copies.append(f"{path.relative_to(root)}:{node.lineno} {found}")
    assert copies == []


def test_list_of_odd_sizes():
    images = [natural(31, 17, 0), natural(8, 45, 1), natural(31, 17, 2), natural(3, 3, 3)]
    before = [i.clone() for i in images]
    actions = ["blur", "pixelate", "blur", "blackout"]
    out = apply_actions(images, actions, blur_radius=0.5, pixelate_block=0.5)
    assert isinstance(out, list) and [o.shape for o in out] == [i.shape for i in images]
    # Each size gets its own pixels: half of 17 (sigma 8.5) and half of 8 (4-pixel blocks).
    torch.testing.assert_close(out[0], gaussian_blur(images[0], 8.5))
    torch.testing.assert_close(out[2], gaussian_blur(images[2], 8.5))
    torch.testing.assert_close(out[1], pixelate(images[1], 4))
    assert torch.equal(out[3], torch.zeros(3, 3, 3))
    assert all(torch.equal(a, b) for a, b in zip(images, before, strict=True))
    kept = apply_actions(images[:1], ["allow"])
    assert torch.equal(kept[0], images[0]) and kept[0] is not images[0]


def test_whole_batch_single_action_and_odd_size():
    x = torch.rand(2, 3, 33, 47)
    # The defaults, 0.05 and 0.03 of the shorter side (33 px): sigma 1.65 px, 1-px blocks, which
    # the floor turns into 2-px blocks so that pixelate always changes the image.
    torch.testing.assert_close(apply_actions(x, ["blur", "blur"]), gaussian_blur(x, 1.65))
    torch.testing.assert_close(apply_actions(x, ["pixelate"] * 2), pixelate(x, 2))


def test_empty_batch():
    empty = torch.zeros(0, 3, 8, 8)
    assert apply_actions(empty, []).shape == (0, 3, 8, 8)
    assert apply_actions([], []) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes(dtype):
    x = torch.rand(3, 3, 20, 20).to(dtype)
    out = apply_actions(x, ["allow", "blur", "pixelate"], blur_radius=0.25, pixelate_block=0.2)
    assert out.dtype == dtype
    assert torch.equal(out[0], x[0])
    torch.testing.assert_close(out[1].float(), gaussian_blur(x[1].float(), 5), atol=1e-2, rtol=0)
    torch.testing.assert_close(out[2].float(), pixelate(x[2].float(), 4), atol=1e-2, rtol=0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda x: apply_actions(x, ["allow", "blurr"]),
            "image 1: unknown action 'blurr' (expected one of allow, review, blur, pixelate, blackout)",
        ),
        (lambda x: apply_actions(x, ["allow"]), "got 1 actions for 2 images"),
        (
            lambda x: apply_actions(x, ["review", "allow"], review_placeholder="review"),
            "review placeholder 'review' is not one of blur, pixelate, blackout"
            " (an image held for review must not be shown as it is)",
        ),
        (
            lambda x: apply_actions(x[0], ["allow"] * 3),
            "images: expected [B,3,H,W], got shape [3, 4, 4]",
        ),
        (  # a radius in pixels, as before strengths were relative
            lambda x: apply_actions(x, ["blur", "allow"], blur_radius=24),
            "blur_radius must be a fraction of the image's shorter side (at most 1), not pixels:"
            " 24 px at 512 px is 0.0469",
        ),
        (
            lambda x: apply_actions(x, ["pixelate", "allow"], pixelate_block=0.001),
            "pixelate_block must be at least 0.02 of the image's shorter side: a weaker"
            " pixelation leaves the image almost as it was",
        ),
        (
            lambda x: apply_actions(x, ["blur", "allow"], blur_radius=0),
            "blur_radius must be at least 0.01 of the image's shorter side: a weaker blur leaves"
            " the image almost as it was",
        ),
    ],
)
def test_bad_actions(call, message):
    with pytest.raises(ActionError) as info:
        call(torch.rand(2, 3, 4, 4))
    assert str(info.value) == message and isinstance(info.value, ModerationError)


def test_hot_path_never_reads_tensor_values_on_the_host():
    # Meta tensors carry no data: any .item(), bool(tensor) or .tolist() would raise.
    x = torch.empty(4, 3, 512, 768, device="meta")
    for actions in (["allow", "review", "pixelate", "blackout"], ["blur"] * 4):
        assert apply_actions(x, actions).shape == x.shape
    assert apply_actions(x, ["blur"] * 4, blur_radius=0.1).device.type == "meta"
    images = [torch.empty(3, 10, 20, device="meta"), torch.empty(3, 7, 7, device="meta")]
    assert [o.shape for o in apply_actions(images, ["blur", "pixelate"])] == [
        (3, 10, 20),
        (3, 7, 7),
    ]


def fundamental(row: torch.Tensor, periods: int) -> float:
    """Amplitude of the sinusoid with `periods` periods across `row` (a discrete Fourier term)."""
    x = torch.arange(row.numel(), dtype=torch.float64) * (2 * math.pi * periods / row.numel())
    centred = row.double() - row.double().mean()
    return float(2 * torch.hypot((centred * torch.cos(x)).mean(), (centred * torch.sin(x)).mean()))


@pytest.mark.parametrize(("action", "periods"), [("blur", 4), ("pixelate", 16)])
def test_strength_hides_the_same_at_512_and_4096(action, periods):
    # The same picture (stripes: `periods` across the image) at 512x512 and 4096x4096 keeps the
    # same share of its detail. With strengths in pixels, 4096 kept 99% where 512 kept 55-81%.
    kept = {}
    for side in (512, 4096):
        xx = torch.arange(side, dtype=torch.float32) * (2 * math.pi * periods / side)
        image = (0.5 + 0.5 * torch.sin(xx)).expand(1, 3, side, side).contiguous()
        out = apply_actions(image, [action])
        kept[side] = fundamental(out[0, 0, side // 2], periods) / fundamental(
            image[0, 0, side // 2], periods
        )
        del image, out
    assert kept[512] < 0.7, kept  # measured: blur 0.52 and 0.52, pixelate 0.48 and 0.49
    assert abs(kept[512] - kept[4096]) < 0.02, kept


@pytest.mark.parametrize("side", [1, 2, 3, 8])
def test_tiny_images_are_still_changed(side):
    # 0.05 of a 3-px side is a fraction of a pixel: the floors (sigma 1 px, 2-px blocks) apply.
    image = checkerboard(side, side)[None]
    for action in ("blur", "pixelate"):
        out = apply_actions(image, [action])
        if side > 1:
            assert not torch.equal(out, image), action
        assert out.shape == image.shape
