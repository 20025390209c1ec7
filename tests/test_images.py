"""Image inputs, CLIP preprocessing against transformers, hashing and PNG."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from moderation.errors import ModerationError
from moderation.image_files import ImageInputError
from moderation.images import (
    ImageBatch,
    batch_sha256,
    clip_preprocess,
    encode_png,
    image_sha256,
    load_image_file,
    to_image_batch,
)
from moderation.preprocess import CLIP_MEAN, CLIP_STD, clip_resize_size

NON_FINITE = "the input image holds NaN or infinite values"

try:  # transformers 5: CLIPImageProcessor() falls back to this class without torchvision
    from transformers import CLIPImageProcessorPil as ReferenceProcessor
except ImportError:  # transformers 4: the PIL-based processor is CLIPImageProcessor itself
    from transformers import CLIPImageProcessor as ReferenceProcessor


def natural_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients, a disc, a box, a thin line and mild noise: [H,W,3] float32 in [0,1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy / height, xx / width
    img = np.stack([0.2 + 0.6 * xx, 0.3 + 0.5 * yy, 0.5 + 0.4 * np.sin(6 * xx + 3 * yy)], -1)
    img[(yy - 0.45) ** 2 + (xx - 0.4) ** 2 < 0.04] = (0.9, 0.2, 0.1)
    img[(np.abs(yy - 0.7) < 0.1) & (np.abs(xx - 0.7) < 0.15)] = (0.1, 0.1, 0.6)
    img[np.abs(xx - yy) < 0.01] = (1.0, 1.0, 1.0)
    img = img + rng.normal(0, 0.03, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def chw(hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(hwc).permute(2, 0, 1)


def to_pil(hwc: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(hwc * 255).astype(np.uint8))


# --- input conversion ---------------------------------------------------------------------------


def test_tensor_minus_one_one_auto_and_round_trip():
    x = chw(natural_image(40, 50))[None].repeat(2, 1, 1, 1) * 2 - 1  # [2,3,40,50] in [-1,1]
    batch = to_image_batch(x)
    assert len(batch) == 2 and batch.images.shape == (2, 3, 40, 50)
    assert batch.signed.tolist() == [True, True]
    torch.testing.assert_close(batch.images, (x + 1) / 2)
    back = batch.to_caller()
    assert back.dtype == x.dtype and back.shape == x.shape
    torch.testing.assert_close(back, x, atol=1e-6, rtol=0)
    assert torch.equal(batch.to_caller(keep=torch.tensor([True, True])), x)


def test_auto_range_is_one_decision_per_batched_object():
    bright = torch.full((3, 8, 8), 0.9)  # a [-1,1] image that happens to have no negatives
    dark = torch.full((3, 8, 8), -0.5)
    batch = to_image_batch(torch.stack([bright, dark]))  # one generator's output: one range
    torch.testing.assert_close(batch.images[0], torch.full((3, 8, 8), 0.95))
    assert batch.signed.tolist() == [True, True]
    assert not to_image_batch(bright[None]).signed.any()


def test_auto_range_is_decided_per_list_item():
    # Regression (issue 8, item 4): one decision per call reread a [0,1] image passed in a list
    # with a [-1,1] tensor as [-1,1] (0.25 -> 0.625), so the engine judged other pixels.
    unit = torch.full((3, 8, 8), 0.25)
    signed = torch.full((3, 8, 8), -0.5)
    batch = to_image_batch([unit, signed])
    assert batch.signed.tolist() == [False, True]
    torch.testing.assert_close(batch.images[0], torch.full((3, 8, 8), 0.25))
    torch.testing.assert_close(batch.images[1], torch.full((3, 8, 8), 0.25))
    back = batch.to_caller()  # each in its own range
    assert torch.equal(back[0], unit) and torch.equal(back[1], signed)
    arrays = to_image_batch([np.full((4, 4, 3), 0.25, np.float32), signed])
    assert arrays.signed.tolist() == [False, True]
    np.testing.assert_array_equal(arrays.to_caller()[0], np.full((4, 4, 3), 0.25, np.float32))


@pytest.mark.parametrize(
    ("image", "value_range"),
    [
        (torch.full((3, 4, 4), 200.0), "auto"),  # 0-255 floats
        (torch.full((3, 4, 4), 3.5), "0,1"),
        (torch.full((3, 4, 4), -3.5), "-1,1"),
        (np.full((4, 4, 3), 128.0, np.float32), "auto"),
    ],
)
def test_floats_far_outside_their_range_are_not_clamped_but_refused(image, value_range):
    batch = to_image_batch([image, torch.full((3, 4, 4), 0.5)], value_range=value_range)
    assert batch.invalid.tolist() == [True, False]
    assert batch.input_errors() == [
        "the input image holds float values far outside [0,1] and [-1,1] "
        "(0-255 floats? pass uint8, or divide by 255)",
        None,
    ]


def test_vae_overshoot_is_clamped_not_refused():
    x = torch.tensor([-1.22, 1.53, 0.0, 2.9]).view(1, 1, 1, 4).repeat(1, 3, 1, 1)  # [-1,1]
    batch = to_image_batch(x, value_range="-1,1")
    assert batch.invalid.tolist() == [False]
    assert batch.images[0, 0, 0].tolist() == [0.0, 1.0, 0.5, 1.0]


@pytest.mark.parametrize(
    ("value_range", "expected"), [("0,1", 0.25), ("-1,1", 0.625), ("auto", 0.25)]
)
def test_explicit_value_range(value_range, expected):
    batch = to_image_batch(torch.full((1, 3, 4, 4), 0.25), value_range=value_range)
    torch.testing.assert_close(batch.images, torch.full((1, 3, 4, 4), expected))
    torch.testing.assert_close(batch.to_caller(), torch.full((1, 3, 4, 4), 0.25))


def test_float16_and_uint8_tensors_keep_their_dtype():
    x16 = chw(natural_image(16, 12)).half()  # [3,H,W], no batch axis
    batch = to_image_batch(x16)
    assert batch.images.dtype == torch.float32 and batch.images.shape == (1, 3, 16, 12)
    back = batch.to_caller()
    assert back.dtype == torch.float16 and back.shape == (3, 16, 12) and torch.equal(back, x16)
    u8 = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    batch = to_image_batch(u8)
    torch.testing.assert_close(batch.images, u8.float() / 255)
    assert torch.equal(batch.to_caller(), u8)


def test_numpy_diffusers_layout_round_trip():
    arr = np.stack([natural_image(24, 32, 1), natural_image(24, 32, 2)])  # [2,H,W,3] float [0,1]
    batch = to_image_batch(arr)
    assert batch.images.shape == (2, 3, 24, 32) and not batch.signed.any()
    back = batch.to_caller()
    assert isinstance(back, np.ndarray) and back.dtype == np.float32 and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    u8 = np.round(arr[0] * 255).astype(np.uint8)  # [H,W,3] uint8
    back = to_image_batch(u8).to_caller()
    assert back.dtype == np.uint8 and np.array_equal(back, u8)


def test_read_only_numpy_input_is_accepted():
    arr = np.zeros((4, 4, 3), dtype=np.uint8)
    arr.flags.writeable = False
    assert len(to_image_batch(arr)) == 1


def test_pil_and_files(tmp_path):
    pil = to_pil(natural_image(20, 30))
    path = tmp_path / "a.png"
    pil.save(path)
    batch = to_image_batch([pil, str(path), path])
    assert batch.images.shape == (3, 3, 20, 30)
    assert batch.paths == [None, str(path), str(path)]
    back = batch.to_caller()
    assert all(isinstance(b, Image.Image) and b.mode == "RGB" for b in back)
    assert all(np.array_equal(np.asarray(b), np.asarray(pil)) for b in back)
    single = to_image_batch(path).to_caller()
    assert isinstance(single, Image.Image)


def test_rgba_is_composited_on_white_like_clip_processor():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    batch = to_image_batch(rgba)
    torch.testing.assert_close(batch.images, torch.ones(1, 3, 4, 4))
    gray = Image.new("L", (4, 4), 128)
    torch.testing.assert_close(to_image_batch(gray).images, torch.full((1, 3, 4, 4), 128 / 255))


def test_mixed_sizes_give_a_list_and_come_back_in_kind():
    t = chw(natural_image(10, 12))
    arr = natural_image(8, 8)
    pil = to_pil(natural_image(6, 9))
    batch = to_image_batch([t, arr, pil])
    assert isinstance(batch.images, list) and [tuple(i.shape) for i in batch.images] == [
        (3, 10, 12),
        (3, 8, 8),
        (3, 6, 9),
    ]
    assert batch.sizes == [(10, 12), (8, 8), (6, 9)]
    back = batch.to_caller()
    assert isinstance(back[0], torch.Tensor) and back[0].shape == (3, 10, 12)
    assert isinstance(back[1], np.ndarray) and back[1].shape == (8, 8, 3)
    assert isinstance(back[2], Image.Image) and back[2].size == (9, 6)
    replaced = batch.to_caller([torch.zeros_like(i) for i in batch.images])
    assert float(replaced[0].abs().sum()) == 0 and replaced[1].sum() == 0


def test_same_sizes_in_a_list_are_stacked():
    batch = to_image_batch([chw(natural_image(8, 8)), natural_image(8, 8, 1)])
    assert isinstance(batch.images, torch.Tensor) and batch.images.shape == (2, 3, 8, 8)


def test_empty_list_is_an_empty_batch():
    batch = to_image_batch([])
    assert len(batch) == 0 and batch.to_caller() == [] and batch.invalid_indices() == []
    assert clip_preprocess(batch).shape == (0, 3, 224, 224)
    assert batch_sha256(batch.images) == []


def test_non_finite_inputs_are_flagged_not_fatal():
    x = torch.rand(4, 3, 8, 8)
    x[1, 0, 2, 2] = float("nan")
    x[3, 2, 0, 0] = float("-inf")
    batch = to_image_batch(x)
    assert batch.invalid_indices() == [1, 3]
    assert batch.invalid.dtype == torch.bool and batch.invalid.shape == (4,)
    assert torch.isfinite(batch.images).all()
    assert not batch.signed.any()  # -inf must not flip the range decision
    assert batch.input_errors() == [None, NON_FINITE, None, NON_FINITE]
    pixels = clip_preprocess(batch)  # invalid rows fail closed downstream
    assert torch.isnan(pixels[[1, 3]]).all() and torch.isfinite(pixels[[0, 2]]).all()
    arr = np.full((2, 4, 4, 3), 0.5, dtype=np.float32)
    arr[0, 0, 0, 0] = np.inf
    assert to_image_batch(arr).invalid_indices() == [0]


def test_input_is_not_modified():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    x[0, 0, 0, 0] = float("nan")
    copy = x.clone()
    to_image_batch(x)
    assert torch.equal(torch.nan_to_num(x), torch.nan_to_num(copy))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda p: [torch.rand(3, 4, 4)] * 3 + [torch.rand(4, 4, 4)],
            "image 3: expected 3 channels, got 4",
        ),
        (lambda p: torch.rand(2, 4, 8, 8), "images: expected 3 channels, got 4"),
        (lambda p: np.zeros((8, 8, 4), np.uint8), "images: expected 3 channels, got 4"),
        (
            lambda p: np.zeros((8, 8), np.uint8),
            "images: expected an image of shape [H,W,3], got shape [8, 8]",
        ),
        (
            lambda p: [torch.rand(1, 3, 4, 4)],
            "image 0: expected one image [3,H,W] in a list, got shape [1, 3, 4, 4]",
        ),
        (
            lambda p: [torch.zeros(3, 4, 4, dtype=torch.int32)],
            "image 0: unsupported dtype torch.int32 (expected uint8 or float)",
        ),
        (
            lambda p: [{"x": 1}],
            "image 0: unsupported image type dict "
            "(expected a tensor, numpy array, PIL image or file path)",
        ),
        (lambda p: torch.rand(3, 0, 4), "images: empty image of shape [3, 0, 4]"),
        (lambda p: [p / "missing.png"], "{tmp}/missing.png: no such file"),
        (lambda p: [p], "{tmp}: is a directory"),
    ],
)
def test_bad_inputs_name_the_item(tmp_path, make, message):
    with pytest.raises(ImageInputError) as info:
        to_image_batch(make(tmp_path))
    assert str(info.value) == message.format(tmp=tmp_path)
    assert isinstance(info.value, ModerationError)


def test_unreadable_file_names_the_file(tmp_path):
    path = tmp_path / "x.png"
    path.write_text("hello")
    with pytest.raises(ImageInputError) as info:
        to_image_batch([path])
    assert str(info.value) == f"{path}: cannot identify image file"
    truncated = tmp_path / "t.png"
    buffer = io.BytesIO()
    to_pil(natural_image(64, 64)).save(buffer, format="PNG")
    truncated.write_bytes(buffer.getvalue()[:200])
    with pytest.raises(ImageInputError, match=f"^{truncated}: cannot read image"):
        load_image_file(truncated)


def test_bad_value_range():
    with pytest.raises(ImageInputError, match="value_range must be"):
        to_image_batch(torch.rand(3, 4, 4), value_range="0,255")


# --- CLIP preprocessing -------------------------------------------------------------------------

SIZES = [
    (64, 64),
    (512, 512),
    (768, 512),
    (300, 1000),
    (225, 224),
    (1000, 223),
    (31, 17),
    (1000, 300),  # Pillow 13 resamples this one vertically first
    (2000, 8),  # taller than 16 crops: we go vertical-first
]


@pytest.fixture(scope="module")
def reference_and_ours():
    """(transformers pixel values, ours) per size; theirs sees uint8 PIL, ours the float image."""
    processor = ReferenceProcessor()
    pairs = []
    for seed, (h, w) in enumerate(SIZES):
        img = natural_image(h, w, seed)
        ref = processor(images=to_pil(img), return_tensors="pt")["pixel_values"]
        pairs.append((ref, clip_preprocess(chw(img))))
    return pairs


def test_clip_resize_size_matches_transformers_rounding():
    assert clip_resize_size(1000, 223) == (1004, 224)  # int(224 * 1000 / 223) = 1004
    assert clip_resize_size(300, 1000) == (224, 746)
    assert clip_resize_size(512, 512) == (224, 224)
    assert clip_resize_size(768, 512, 336) == (504, 336)


def test_clip_preprocess_pixels_match_transformers(reference_and_ours):
    # Mean bound: the reference rounds to uint8 twice (our float input, its output); a uniform
    # rounding error alone gives 0.25/255 / std ~= 0.0037 (measured exactly that with no resize).
    # Measured on these sizes 0.0036-0.0054; a single bicubic pass without antialias measures
    # 0.0095-0.080 on resized sizes, so 0.0075 separates the two.
    # Per pixel: within 2 uint8 steps (measured max 1.5), except where PIL and we resample the two
    # axes in a different order and so clip bicubic overshoot at different places (Pillow 13
    # chooses the order per image): measured <= 0.23% of values, so allow 0.5%.
    two_steps = 2 / 255 / min(CLIP_STD)
    for (ref, ours), size in zip(reference_and_ours, SIZES, strict=True):
        assert ours.shape == ref.shape == (1, 3, 224, 224), size
        diff = (ours - ref).abs()
        assert diff.mean() < 0.0075, (size, float(diff.mean()))
        assert (diff > two_steps).float().mean() < 0.005, size


def test_pixel_bound_rejects_a_resize_without_antialias():
    img = natural_image(512, 512)
    ref = ReferenceProcessor()(images=to_pil(img), return_tensors="pt")["pixel_values"]
    plain = F.interpolate(chw(img)[None], size=(224, 224), mode="bicubic").clamp(0, 1)
    plain = (plain - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    assert (plain - ref).abs().mean() > 0.05  # measured 0.069: far outside the 0.0075 bound


def test_clip_preprocess_is_exact_on_uint8_without_resize():
    u8 = np.round(natural_image(225, 224) * 255).astype(np.uint8)
    ref = ReferenceProcessor()(images=Image.fromarray(u8), return_tensors="pt")["pixel_values"]
    ours = clip_preprocess(torch.from_numpy(u8).permute(2, 0, 1))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_clip_preprocess_embeddings_match_transformers(reference_and_ours):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=32,
        image_size=224,
        projection_dim=32,
    )
    model = CLIPVisionModelWithProjection(config).eval()
    ref = torch.cat([r for r, _ in reference_and_ours])
    ours = torch.cat([o for _, o in reference_and_ours])
    with torch.no_grad():
        cos = F.cosine_similarity(
            model(pixel_values=ref).image_embeds, model(pixel_values=ours).image_embeds
        )
    assert (cos >= 0.999).all(), cos  # measured >= 0.999999 on every size


def test_clip_preprocess_batch_and_list_agree_with_single_calls():
    imgs = [chw(natural_image(h, w, i)) for i, (h, w) in enumerate([(50, 70), (90, 60), (50, 70)])]
    singles = torch.cat([clip_preprocess(i) for i in imgs])
    torch.testing.assert_close(clip_preprocess(imgs), singles)  # grouped by size
    torch.testing.assert_close(clip_preprocess(torch.stack([imgs[0], imgs[2]])), singles[[0, 2]])
    batch = to_image_batch(imgs)
    torch.testing.assert_close(clip_preprocess(batch), singles)
    assert clip_preprocess(torch.zeros(0, 3, 64, 64)).shape == (0, 3, 224, 224)


def test_clip_preprocess_custom_size_and_normalisation():
    x = torch.full((1, 3, 100, 400), 0.5)
    out = clip_preprocess(x, size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert out.shape == (1, 3, 64, 64)
    torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-6, rtol=0)
    assert clip_preprocess(x).dtype == torch.float32
    assert isinstance(to_image_batch(x), ImageBatch)
    torch.testing.assert_close(
        clip_preprocess(x)[0, :, 0, 0],
        (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD),
    )


# --- hashing, PNG, files ------------------------------------------------------------------------


def test_image_sha256_is_of_uint8_hwc_bytes_and_shape(tmp_path):
    u8 = np.round(natural_image(9, 7) * 255).astype(np.uint8)
    expected = hashlib.sha256(b"rgb8:9x7\n" + u8.tobytes()).hexdigest()
    t = torch.from_numpy(u8).permute(2, 0, 1).float() / 255
    assert image_sha256(t) == expected
    assert image_sha256(t.double()) == expected
    path = tmp_path / "h.png"
    Image.fromarray(u8).save(path)
    assert image_sha256(load_image_file(path)) == expected
    assert image_sha256(torch.zeros(3, 2, 4)) != image_sha256(torch.zeros(3, 4, 2))


def test_batch_sha256_matches_single_hashes():
    imgs = [chw(natural_image(5, 6, 0)), chw(natural_image(7, 3, 1))]
    assert batch_sha256(imgs) == [image_sha256(i) for i in imgs]
    stacked = torch.stack([imgs[0], imgs[0] * 0.5])
    assert batch_sha256(stacked) == [image_sha256(i) for i in stacked]


def test_encode_png_round_trips():
    t = chw(natural_image(11, 13))
    png = encode_png(t)
    assert png.startswith(b"\x89PNG")
    decoded = np.asarray(Image.open(io.BytesIO(png)))
    assert decoded.shape == (11, 13, 3)
    assert hashlib.sha256(b"rgb8:11x13\n" + decoded.tobytes()).hexdigest() == image_sha256(t)


def test_load_image_file_jpeg_and_palette(tmp_path):
    pil = to_pil(natural_image(16, 24))
    pil.save(tmp_path / "a.jpg", quality=95)
    pil.convert("P").save(tmp_path / "b.gif")
    for name in ("a.jpg", "b.gif"):
        t = load_image_file(tmp_path / name)
        assert t.shape == (3, 16, 24) and t.dtype == torch.float32
        assert 0 <= float(t.min()) and float(t.max()) <= 1


@pytest.mark.parametrize("value_range", ["auto", "-1,1"])
def test_hot_path_never_reads_tensor_values_on_the_host(value_range):
    # Meta tensors carry no data: any .item(), bool(tensor) or .tolist() would raise, so this
    # proves conversion and preprocessing need no host sync on a GPU.
    x = torch.empty(3, 3, 512, 768, device="meta")
    batch = to_image_batch(x, value_range=value_range)
    assert batch.images.device.type == "meta" and batch.invalid.shape == (3,)
    assert clip_preprocess(batch).shape == (3, 3, 224, 224)
    mixed = [torch.empty(3, 100, 200, device="meta"), torch.empty(3, 50, 60, device="meta")]
    assert clip_preprocess(to_image_batch(mixed)).shape == (2, 3, 224, 224)
    u8 = torch.empty(2, 3, 8, 8, dtype=torch.uint8, device="meta")
    assert to_image_batch(u8).to_caller().dtype == torch.uint8
    keep = torch.ones(3, dtype=torch.bool, device="meta")
    assert batch.to_caller(keep=keep).device.type == "meta"
