"""The data of docs/calibration.md's walk-through, offline: `python -m moderation.demo_calibration`.

Writes FOLDER (default demo/calibration):

- `tiny-clip/`: a random tiny CLIP (as `python -m moderation.demo`);
- `calib.yaml` and `moderation.db`: a policy whose concepts are basis vectors of that model's
  32-wide space, and 22 decisions the engine made and logged from engineered embeddings (an
  embedding with cosine 0.35 to the nudity direction scores exactly 0.35), 19 of them waiting
  for review: every number of the walk-through can be checked by hand;
- `logos.yaml`, `examples/logo/` and `labelled/{logo,clean,gray}/`: a concept learnt from example
  images, and folders of labelled images (one labelled logo is a copy of an example).

Its decisions show the machinery, not judgement (random weights, engineered embeddings).
"""

from __future__ import annotations

import argparse
import io
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DIM = 32
NUDITY, GORE, MINOR = 0, 1, 2  # the basis directions of calib.yaml's concepts
FILLER = DIM - 1  # makes every embedding unit length

CALIB = """\
# A policy for the calibration walk-through: concepts are basis vectors of tiny-clip's space.
policy: calib
version: 1
model: {model}
defaults: {{threshold: 0.3, action: review, severity: high}}
review_band: 0.02
on_error: blackout

concepts:
  # thresholds are guesses until calibrated
  - name: nudity
    embedding: {e0}
    threshold: 0.3   # calibrate me
    action: review

  - name: gore
    embedding: {e1}
    severity: critical

special_care:
  adjustment: 0.01
  escalate: review
  concepts:
    - name: minor
      embedding: {e2}
      threshold: 0.25
"""

LOGOS = """\
# A concept learnt from example images (docs/policy-extends.md), calibrated on labelled folders.
policy: logos
version: 1
model: tiny-clip
concepts:
  - name: logo
    examples: examples/logo
    threshold: 0.9
    action: blur
"""

# (cosine with its direction, what the walk-through's reviewer says): review items 1-19, in order.
DECISIONS = [
    *[(NUDITY, c) for c in (0.40, 0.38, 0.36, 0.35, 0.34, 0.33, 0.32, 0.31, 0.295, 0.29, 0.285)],
    (GORE, 0.40), (GORE, 0.40), (GORE, 0.32),
    *[(MINOR, 0.30)] * 5,
    *[(NUDITY, 0.10)] * 3,  # allowed: never reviewed
]  # fmt: skip


def basis(k: int) -> list[float]:
    return [1.0 if i == k else 0.0 for i in range(DIM)]


def embedding(direction: int, cosine: float) -> np.ndarray:
    """A unit [DIM] float32 vector with the given cosine to one basis direction (0 to the others)."""
    vector = np.zeros(DIM, dtype=np.float64)
    vector[direction] = cosine
    vector[FILLER] = math.sqrt(1.0 - cosine**2)
    return vector.astype(np.float32)


def _png(draw, seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(np.clip(rng.normal(235, 12, (size, size, 3)), 0, 255).astype(np.uint8))
    draw(ImageDraw.Draw(image), rng)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _logo(seed: int) -> bytes:
    def draw(canvas, rng):
        x, y = (int(v) for v in rng.integers(4, 14, 2))
        red = (int(rng.integers(180, 230)), 30, 40)
        canvas.ellipse((x, y, x + 44, y + 44), fill=red)
        canvas.rectangle((x + 16, y + 18, x + 28, y + 26), fill=(250, 250, 250))

    return _png(draw, seed)


def _clean(seed: int) -> bytes:
    def draw(canvas, rng):
        for _ in range(3):
            x0, y0 = (int(v) for v in rng.integers(0, 40, 2))
            colour = (30, int(rng.integers(60, 160)), int(rng.integers(150, 230)))
            canvas.rectangle((x0, y0, x0 + 24, y0 + 24), fill=colour)

    return _png(draw, seed)


def _gray(seed: int) -> bytes:
    def draw(canvas, rng):
        level = int(rng.integers(60, 200))
        canvas.rectangle((8, 8, 56, 56), fill=(level, level, level))

    return _png(draw, seed)


def write_images(folder: Path) -> None:
    examples = folder / "examples" / "logo"
    for name, count, make, seed in [
        ("examples/logo", 3, _logo, 1000),
        ("labelled/logo", 20, _logo, 0),
        ("labelled/clean", 15, _clean, 100),
        ("labelled/gray", 15, _gray, 200),
    ]:
        target = folder / name
        target.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (target / f"{target.name}-{i:02d}.png").write_bytes(make(seed + i))
    shutil.copy(examples / "logo-00.png", folder / "labelled" / "logo" / "copy-of-an-example.png")


def write_log(folder: Path) -> int:
    """Decide DECISIONS with calib.yaml and log them to FOLDER/moderation.db; the count."""
    import torch

    from moderation.encoder import ClipEncoder
    from moderation.engine import Moderator
    from moderation.storage.log import DecisionLog
    from policy import compile_policy, load_policy

    encoder = ClipEncoder.from_pretrained(folder / "tiny-clip")
    compiled = compile_policy(load_policy(folder / "calib.yaml"), encoder, cache=False)
    log = DecisionLog(
        f"sqlite:///{folder / 'moderation.db'}",
        spool_dir=folder / "spool",
        held_dir=folder / "held",
    )
    try:
        moderator = Moderator(compiled, log=log)
        vectors = np.stack([embedding(d, c) for d, c in DECISIONS])
        moderator.moderate_embeddings(torch.from_numpy(vectors), metadata={"user": "walk-through"})
        log.flush()
    finally:
        log.close()
    return len(DECISIONS)


def prepare(folder: Path) -> None:
    import os

    from moderation.synthetic import quiet_tiny_clip

    if (folder / "moderation.db").exists():
        raise SystemExit(f"Error: {folder / 'moderation.db'} exists: remove {folder} first")
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    quiet_tiny_clip(folder / "tiny-clip")
    vectors = {f"e{k}": basis(k) for k in (NUDITY, GORE, MINOR)}
    (folder / "calib.yaml").write_text(CALIB.format(model="tiny-clip", **vectors), encoding="utf-8")
    (folder / "logos.yaml").write_text(LOGOS, encoding="utf-8")
    write_images(folder)
    count = write_log(folder)
    print(
        f"wrote {folder}: calib.yaml and moderation.db ({count} decisions, 19 awaiting review),"
        " logos.yaml, examples/logo (3 images) and labelled/ (logo 21, clean 15, gray 15 images)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moderation.demo_calibration",
        description="Write the data of docs/calibration.md's walk-through: a tiny random CLIP, "
        "calib.yaml and a log of 22 decisions made from engineered embeddings, logos.yaml and "
        "folders of labelled images.",
    )
    parser.add_argument(
        "folder",
        nargs="?",
        default="demo/calibration",
        type=Path,
        metavar="FOLDER",
        help="where to write (default: demo/calibration); must not hold a log yet",
    )
    prepare(parser.parse_args(argv).folder)


if __name__ == "__main__":
    main()
