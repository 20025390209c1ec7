"""Frame and page bombs (issue 15 item 7): a file whose frames would decode to far more pixels
than its size suggests is refused by the per-file decode budget, in bounded time and memory,
and becomes an `error` decision (fail closed); an ordinary animation decodes each frame once.

The bombs are decoded in a child process so that its time and peak memory are its own."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from moderation.image_files import FILE_PIXELS, ImageInputError, read_image
from tests.bombs import apng_bomb, gif_bomb, tiff_bomb, webp_bomb

SECONDS = 5.0
MEMORY = 1 << 30

CHILD = textwrap.dedent(
    """
    import json, sys, time
    from moderation.image_files import ImageInputError, read_image
    start = time.perf_counter()
    try:
        read_image(sys.argv[1])
        outcome = "decoded"
    except ImageInputError as err:
        outcome = str(err)
    seconds = time.perf_counter() - start
    # VmHWM: this process's own peak. ru_maxrss would also count the parent's resident pages
    # at fork time (Linux keeps that high-water mark across exec): a large pytest process
    # would make every child look large.
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) * 1024
    print(json.dumps({"seconds": seconds, "peak": peak, "outcome": outcome}))
    """
)


def decode_in_child(path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout.splitlines()[-1])


BOMBS = {
    "gif": (lambda: gif_bomb(13000, 50), "bomb.gif", "50 frames of 13000x13000"),
    "apng": (lambda: apng_bomb(8000, 50), "bomb.png", "50 frames of 8000x8000"),
    "webp": (lambda: webp_bomb(8000, 50), "bomb.webp", "50 frames of 8000x8000"),
    "tiff": (lambda: tiff_bomb(8000, 20), "bomb.tiff", "20 pages"),
}


@pytest.mark.bombs
@pytest.mark.parametrize("kind", list(BOMBS))
def test_a_bomb_is_refused_within_time_and_memory_bounds(kind, tmp_path):
    build, name, what = BOMBS[kind]
    path = tmp_path / name
    path.write_bytes(build())
    assert path.stat().st_size < 1_000_000
    measured = decode_in_child(path)
    assert measured["outcome"].startswith(f"{path}: {what} would decode ")
    assert measured["outcome"].endswith(
        f"pixels, more than the {FILE_PIXELS:,} allowed per file "
        "(max_decoded_pixels, MODERATION_MAX_DECODED_PIXELS)"
    )
    assert measured["seconds"] < SECONDS, measured
    assert measured["peak"] < MEMORY, measured


def test_the_budget_is_configurable_per_call_and_by_environment(tmp_path, monkeypatch):
    path = tmp_path / "small.gif"
    path.write_bytes(gif_bomb(100, 10))  # 10 frames of 100x100: 100,000 pixels
    assert read_image(path).frame_count == 10
    with pytest.raises(ImageInputError, match="10 frames of 100x100 would decode 100,000 pixels"):
        read_image(path, max_decoded_pixels=99_999)
    monkeypatch.setenv("MODERATION_MAX_DECODED_PIXELS", "50000")
    with pytest.raises(ImageInputError, match="more than the 50,000 allowed per file"):
        read_image(path)
    monkeypatch.setenv("MODERATION_MAX_DECODED_PIXELS", "0")
    with pytest.raises(Exception, match="MODERATION_MAX_DECODED_PIXELS='0': not a positive"):
        read_image(path)


def test_the_time_budget_stops_between_frames(tmp_path, monkeypatch):
    import moderation.image_files as image_files

    path = tmp_path / "slow.gif"
    path.write_bytes(gif_bomb(64, 20))
    clock = iter(range(1000))
    monkeypatch.setattr(image_files.time, "monotonic", lambda: float(next(clock)))
    with pytest.raises(ImageInputError, match=r"decoding took more than the 5 s allowed per file"):
        read_image(path, max_seconds=5)


@pytest.mark.parametrize("kind", ["gif", "apng", "webp"])
def test_each_frame_of_an_animation_is_decoded_once(kind, tmp_path, monkeypatch):
    from PIL import ImageFile

    build = {"gif": gif_bomb, "apng": apng_bomb, "webp": webp_bomb}[kind]
    path = tmp_path / f"anim.{kind}"
    path.write_bytes(build(64, 12))
    decoded = []
    real = ImageFile.ImageFile.load_prepare

    def counting(self):
        decoded.append(self.tell())
        return real(self)

    if kind != "webp":
        monkeypatch.setattr(ImageFile.ImageFile, "load_prepare", counting)
    else:  # WebP frames come from libwebp's animation decoder, one call per frame
        from PIL import WebPImagePlugin

        real_next = WebPImagePlugin.WebPImageFile._get_next

        def next_frame(self):
            decoded.append(self.tell())
            return real_next(self)

        monkeypatch.setattr(WebPImagePlugin.WebPImageFile, "_get_next", next_frame)
    image = read_image(path)
    assert image.frame_count == 12 and len(image.frame_numbers) == 12
    assert sorted(decoded) == list(range(12)), decoded


def test_a_bomb_given_to_check_is_an_error_decision(tmp_path, tiny_clip_dir, monkeypatch):
    from click.testing import CliRunner

    from moderation.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bomb.gif").write_bytes(gif_bomb(4000, 50))  # 800 M pixels once composited
    Image.new("RGB", (64, 64), (10, 200, 30)).save(folder / "fine.png")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"policy: bombs\nmodel: {tiny_clip_dir}\non_error: blackout\nconcepts:\n"
        "  - name: any\n    prompts: [a photo]\n    threshold: 0.99\n    action: blur\n"
    )
    result = CliRunner().invoke(
        main, ["check", str(folder), "--policy", str(policy), "--no-log", "--json"]
    )
    assert result.exit_code == 1, result.output
    rows = {r["file"].rsplit("/", 1)[-1]: r for r in json.loads(result.stdout)}
    assert rows["bomb.gif"]["verdict"] == "error" and rows["bomb.gif"]["action"] == "blackout"
    assert "would decode 800,000,000 pixels" in rows["bomb.gif"]["error"]
    assert rows["fine.png"]["verdict"] == "allow"


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("GIF", {}),
        ("PNG", {}),
        ("PNG", {"default_image": True}),  # an IDAT image that is not an animation frame
        ("WEBP", {"lossless": True}),
    ],
)
def test_durations_read_from_the_container_are_pillows(fmt, options, tmp_path):
    from moderation.frame_timing import durations_ms

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    frames = [Image.new("RGB", (16, 16), c) for c in colours]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(
        path, format=fmt, save_all=True, append_images=frames[1:],
        duration=[100, 250, 1000, 40], loop=0, **options,
    )  # fmt: skip
    with Image.open(path) as image:
        expected = []
        for number in range(image.n_frames):
            image.seek(number)
            image.load()
            expected.append(int(image.info.get("duration") or 0))
    assert durations_ms(path, fmt) == expected


def test_a_later_tiff_page_over_the_pixel_cap_is_refused(tmp_path):
    path = tmp_path / "pages.tiff"
    small, big = Image.new("1", (64, 64), 1), Image.new("1", (4000, 4000), 1)
    small.save(path, format="TIFF", compression="group4", save_all=True, append_images=[big])
    with pytest.raises(ImageInputError, match="frame 1 is 4000x4000, 16,000,000 pixels, more"):
        read_image(path, max_pixels=10_000_000)
