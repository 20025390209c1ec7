"""Prepare the offline demo: a tiny random CLIP checkpoint and a folder of sample images.

`python -m moderation.demo [FOLDER]` writes FOLDER/tiny-clip and FOLDER/images (default: demo/).
The tiny model has random weights, so its decisions show the machinery, not judgement: run the
same commands with `--model openai/clip-vit-large-patch14` on a machine that can download it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def sample_images(folder: Path, n: int = 12, seed: int = 0) -> list[Path]:
    """Write n varied synthetic PNGs (gradients, shapes, noise; several sizes)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(512, 512), (640, 480), (480, 640), (768, 512), (256, 256), (300, 900)]
    paths = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        y, x = np.mgrid[0:h, 0:w]
        base = rng.uniform(0, 255, 3)
        tilt = rng.uniform(-0.5, 0.5, (2, 3))
        pixels = (
            base + x[..., None] * tilt[0] + y[..., None] * tilt[1] + rng.normal(0, 8, (h, w, 3))
        )
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(2, 7))):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            box = (x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2)))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        path = folder / f"sample-{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def prepare(folder: Path) -> None:
    from moderation.testing import make_tiny_clip

    make_tiny_clip(folder / "tiny-clip")
    sample_images(folder / "images")
    print(
        f"wrote {folder / 'tiny-clip'} (random tiny CLIP) and {folder / 'images'} (12 sample images)"
    )


if __name__ == "__main__":
    prepare(Path(sys.argv[1] if len(sys.argv) > 1 else "demo"))
