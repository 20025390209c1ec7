"""Image files (issue 8, items 3 and 16): conversion by bit depth, a decode budget and a pixel cap,
on real files written by PIL and numpy."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from moderation.image_files import read_image
from moderation.images import ImageInputError, load_image_file, to_image_batch
from tests.test_images import natural_image


def gray16(height: int = 16, width: int = 24) -> np.ndarray:
    """A 16-bit grey ramp from 0 to 65535 across the width, [H, W] uint16."""
    return np.tile(np.linspace(0, 65535, width).round().astype(np.uint16), (height, 1))


def expected8(values: np.ndarray, top: float) -> np.ndarray:
    return np.round(values.astype(np.float64) / top * 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("suffix", "array", "mode"),
    [
        (".png", gray16(), "I;16"),
        (".tiff", gray16(), "I;16"),
        (".tiff", gray16().astype(">u2"), "I;16B"),
        (".tiff", gray16().astype(np.int32), "I"),
    ],
)
def test_16_bit_greys_are_scaled_by_their_depth_not_clipped(tmp_path, suffix, array, mode):
    # Regression (issue 8, item 3): PIL's convert("RGB") clips 16-bit values at 255, so a
    # mid-grey 16-bit image was judged as almost white.
    path = tmp_path / f"g{suffix}"
    Image.fromarray(array).save(path)
    with Image.open(path) as image:
        assert image.mode == mode
        assert np.asarray(image.convert("RGB")).mean() > 240  # what PIL alone makes of it
    frames = read_image(path).frames  # [1,3,H,W] uint8
    assert frames.shape == (1, 3, 16, 24)
    want = expected8(gray16(), 65535)
    for channel in frames[0]:
        assert np.abs(channel.numpy().astype(int) - want).max() <= 1
    assert float(load_image_file(path).mean()) == pytest.approx(0.5, abs=0.01)


def test_32_bit_integers_beyond_16_bits_use_their_own_range(tmp_path):
    values = (gray16().astype(np.int32) - 20000) * 3  # -60000 .. 136605
    path = tmp_path / "i.tiff"
    Image.fromarray(values).save(path)
    got = read_image(path).frames[0, 0].numpy()
    assert got[:, 0].tolist() == [0] * 16 and got[:, -1].tolist() == [255] * 16


@pytest.mark.parametrize(
    ("values", "top"),
    [
        (np.linspace(0, 1, 24, dtype=np.float32), 1.0),  # [0,1] floats are read as [0,1]
        (np.linspace(0, 0.5, 24, dtype=np.float32), 1.0),  # ... even when they stay dark
        (np.linspace(0, 1000, 24, dtype=np.float32), 1000.0),  # else by their own range
    ],
)
def test_float_tiffs_are_read_by_their_range(tmp_path, values, top):
    path = tmp_path / "f.tiff"
    Image.fromarray(np.tile(values, (8, 1))).save(path)
    with Image.open(path) as image:
        assert image.mode == "F"
    got = read_image(path).frames[0, 1, 0].numpy()
    assert np.abs(got.astype(int) - expected8(values, top)).max() <= 1


@pytest.mark.parametrize("overshoot", [(0, -0.001), (-1, 1.001), (0, -0.4), (-1, 1.6)])
def test_overshoot_does_not_rescale_a_float_tiff(tmp_path, overshoot):
    """Regression: one pixel a little beyond [0,1] made the whole image read by its own range
    (1.6 at the top darkened every other pixel by 40%)."""
    values = np.linspace(0.1, 0.9, 24, dtype=np.float32)
    shot = values.copy()
    shot[overshoot[0]] = overshoot[1]
    path = tmp_path / "f.tiff"
    Image.fromarray(np.tile(shot, (8, 1))).save(path)
    got = read_image(path).frames[0, 1, 0].numpy()
    assert np.abs(got[1:-1].astype(int) - expected8(values, 1.0)[1:-1]).max() <= 1
    assert got[overshoot[0]] == (0 if overshoot[1] < 0 else 255)


def test_a_float_tiff_with_nan_is_not_readable(tmp_path):
    values = np.zeros((4, 4), np.float32)
    values[1, 2] = np.nan
    path = tmp_path / "nan.tiff"
    Image.fromarray(values).save(path)
    with pytest.raises(ImageInputError) as info:
        read_image(path)
    assert str(info.value) == f"{path}: the image holds NaN or infinite values"


def test_a_file_over_the_pixel_cap_is_refused_before_it_is_decoded(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    with pytest.raises(ImageInputError) as info:
        read_image(path, max_pixels=50_000)
    assert str(info.value) == (
        f"{path}: 300x200 is 60,000 pixels, more than the 50,000 allowed (max_pixels)"
    )
    with pytest.raises(ImageInputError, match="more than the 50,000 allowed"):
        to_image_batch([path], max_pixels=50_000)


def test_a_large_file_is_reduced_while_decoded(tmp_path):
    pixels = (natural_image(200, 300) * 255).round().astype(np.uint8)
    path = tmp_path / "large.png"
    Image.fromarray(pixels).save(path)
    file = read_image(path, decode_pixels=10_000)  # factor ceil(sqrt(60000 / 10000)) = 3
    assert file.reduced == 3 and file.size == (67, 100)  # PIL rounds up
    box = np.asarray(Image.fromarray(pixels).reduce(3))
    assert np.array_equal(file.frames[0].permute(1, 2, 0).numpy(), box)
    assert read_image(path).size == (200, 300)  # within the default budget: as it is
    batch = to_image_batch(path, decode_pixels=10_000)
    assert batch.sizes == [(67, 100)] and batch.to_caller().size == (100, 67)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    path = tmp_path / "large.jpg"
    Image.fromarray((natural_image(800, 800) * 255).round().astype(np.uint8)).save(path)
    file = read_image(path, decode_pixels=40_000)  # factor 4: JPEG's 1/4 DCT scale
    assert file.size == (200, 200) and file.reduced == 4


def test_exif_orientation_is_applied(tmp_path):
    image = Image.fromarray((natural_image(20, 30) * 255).round().astype(np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show it
    path = tmp_path / "turned.jpg"
    image.save(path, exif=exif, quality=95)
    assert read_image(path).size == (30, 20)


PEAK_RSS = """
import resource, sys
import numpy as np
from PIL import Image
sys.path.insert(0, {root!r})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from moderation.images import to_image_batch, clip_preprocess
batch = to_image_batch([{path!r}])
clip_preprocess(batch)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.slow
def test_a_huge_png_is_decoded_within_a_bounded_budget(tmp_path):
    # A 6000 x 6000 PNG (36 MP, 108 MB as 8-bit RGB) took ~1.9 GB before the decode budget
    # (float32 copies of the full image); now its 8-bit decode plus the 16 MP reduced image.
    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((6000, 6000, 3), np.uint8)).save(path, compress_level=1)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = textwrap.dedent(PEAK_RSS.format(root=root, path=str(path)))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grew_kib = int(out.stdout.strip().splitlines()[-1])
    assert grew_kib < 700 * 1024, grew_kib  # measured ~0.4 GB; was ~1.9 GB


def test_images_from_files_are_uint8_until_the_engine_converts_them(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (5, 4), (10, 20, 30)).save(path)
    file = read_image(path)
    assert file.frames.dtype == torch.uint8 and file.frames.shape == (1, 3, 4, 5)
    assert not file.animated and file.frame_numbers == (0,)
