"""Test helpers for `moderation serve`: a tiny policy whose thresholds split the sample images,
the images as data URLs, and a running server (uvicorn on a free loopback port, in a thread)."""

from __future__ import annotations

import base64
import contextlib
import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from moderation.demo import sample_images
from moderation.engine import Moderator
from moderation.image_files import read_image
from moderation.server.app import create_app
from moderation.server.config import ServeConfig
from moderation.server.keys import create_key
from moderation.server.run import ThreadedServer
from moderation.storage import upgrade

CONCEPTS = (  # name, category, action, prompt
    ("nude", "sexual", "blur", "a photo of a naked person"),
    ("gore", "violence", "blackout", "blood and wounds"),
    ("blade", "weapons", "review", "a knife"),
)


def policy_text(model: Path, thresholds: list[float]) -> str:
    rows = "".join(
        f"  - name: {n}\n    category: {c}\n    prompts: [{p}]\n    threshold: {t!r}\n"
        f"    action: {a}\n"
        for (n, c, a, p), t in zip(CONCEPTS, thresholds, strict=True)
    )
    return f"policy: served\nmodel: {model}\non_error: blackout\nconcepts:\n{rows}"


def split_policy(folder: Path, model: Path, images: list[Path]) -> Path:
    """A policy whose thresholds sit between the images' cosines (some fire, some do not)."""
    probe = folder / "probe.yaml"
    probe.write_text(policy_text(model, [0.0] * len(CONCEPTS)))
    with Moderator.from_policy(probe) as m:
        result = m.moderate([read_image(p) for p in images], apply=False)
    cosines = np.stack([d.cosines for d in result.decisions])  # [N, C]
    thresholds = [float(np.quantile(cosines[:, c], q)) for c, q in enumerate((0.5, 0.7, 0.85))]
    path = folder / "policy.yaml"
    path.write_text(policy_text(model, thresholds))
    return path


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = zlib.compress(b"\x00" * 64)
    idat = b"IDAT" + body

    def packed(c: bytes) -> bytes:
        return struct.pack(">I", len(c) - 4) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + packed(chunk) + packed(idat) + packed(b"IEND")


def sample_pngs(folder: Path, n: int = 6) -> list[Path]:
    return sample_images(folder, n=n)


@contextlib.contextmanager
def running(
    policy: Path, url: str, folder: Path, *, moderator: Moderator | None = None, **config
) -> Iterator[tuple[ThreadedServer, str]]:
    """A server for `policy` logging to `url` (migrated first, as `moderation db upgrade` does:
    the keys are read from it), and a fresh API key named `app-1`."""
    key = ""
    if config.get("auth", True):
        upgrade(url)
        key = create_key(url, "app-1")
    if moderator is None:
        moderator = Moderator.from_policy(
            policy, db=url, spool_dir=folder / "spool", held_dir=folder / "held"
        )
    app = create_app(moderator, ServeConfig(**config))
    with ThreadedServer(app) as server:
        yield server, key
