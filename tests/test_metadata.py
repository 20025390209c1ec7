"""Caller metadata the log cannot store is refused before any image is touched (issue 7)."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch

from moderation.engine import Moderator
from moderation.storage.storable import MetadataError
from policy import compile_policy, load_policy

NAN = "NaN and infinity are not JSON numbers"
BAD_METADATA = [
    ({"seed": float("nan")}, f"metadata['seed'] cannot be stored as JSON: {NAN}"),
    ({"seed": np.float32("inf")}, f"metadata['seed'] cannot be stored as JSON: {NAN}"),
    ({"scores": [0.5, float("-inf")]}, f"metadata['scores'] cannot be stored as JSON: {NAN}"),
    (
        {"raw": b"\x89PNG"},
        "metadata['raw'] cannot be stored as JSON: bytes is not JSON serializable",
    ),
    (
        {"who": object()},
        "metadata['who'] cannot be stored as JSON: object is not JSON serializable",
    ),
    (
        {"prompt": "caf\udce9"},  # undecodable bytes, as Python reads them from argv or a name
        "metadata['prompt'] holds a lone surrogate (not valid Unicode text); remove it",
    ),
    (
        {("a", 1): "x"},
        "metadata[('a', 1)]: the key cannot be stored as JSON: keys must be str, int, float, "
        "bool or None, not tuple",
    ),
]


@pytest.fixture
def moderator(tmp_path, encoder, tiny_clip_dir):
    """Every image goes to review, so acting on one would hold its original on disk."""
    path = tmp_path / "p.yaml"
    path.write_text(
        f"policy: meta\nmodel: {tiny_clip_dir}\n"
        "concepts:\n  - {name: all, prompts: [a photo], threshold: -1, action: review}\n"
    )
    from moderation.storage import DecisionLog

    log = DecisionLog(
        f"sqlite:///{tmp_path / 'm.db'}", spool_dir=tmp_path / "spool", held_dir=tmp_path / "held"
    )
    with Moderator(compile_policy(load_policy(path), encoder), encoder, log=log) as moderator:
        yield moderator


def nothing_happened(tmp_path):
    with sqlite3.connect(tmp_path / "m.db") as db:
        assert db.execute("select count(*) from decisions").fetchone() == (0,)
    held = tmp_path / "held"
    assert not held.exists() or not any(p.is_file() for p in held.rglob("*"))
    spool = tmp_path / "spool"
    assert not spool.exists() or not any(spool.iterdir())


@pytest.mark.parametrize(("metadata", "message"), BAD_METADATA)
def test_moderate_refuses_metadata_it_cannot_store(tmp_path, moderator, metadata, message):
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(MetadataError) as info:
        moderator.moderate(images, metadata=metadata)
    assert str(info.value) == message
    nothing_happened(tmp_path)


def test_per_image_metadata_names_the_image(tmp_path, moderator):
    with pytest.raises(MetadataError) as info:
        moderator.moderate(torch.rand(2, 3, 32, 32), metadata=[{"seed": 1}, {"seed": b"2"}])
    assert str(info.value) == (
        "metadata[1]['seed'] cannot be stored as JSON: bytes is not JSON serializable"
    )
    nothing_happened(tmp_path)


def test_moderate_embeddings_and_fail_refuse_it_too(tmp_path, moderator, encoder):
    with pytest.raises(MetadataError, match=r"^metadata\['seed'\] cannot be stored as JSON"):
        moderator.moderate_embeddings(torch.randn(1, encoder.embed_dim), metadata={"seed": np.nan})
    with pytest.raises(MetadataError, match=r"^metadata\[0\]\['file'\] cannot be stored"):
        moderator.fail(["unreadable"], metadata=[{"file": object()}])
    nothing_happened(tmp_path)


def test_numpy_scalars_are_stored_as_numbers(tmp_path, moderator):
    result = moderator.moderate(torch.rand(1, 3, 32, 32), metadata={"seed": np.int64(7)})
    moderator.log.flush()
    with sqlite3.connect(tmp_path / "m.db") as db:
        assert db.execute("select meta from decisions").fetchone() == ('{"seed":7}',)
    assert result.decisions[0].image_sha256 is not None


def test_image_sha256_without_a_log_when_asked(encoder, moderator):
    from moderation.images import image_sha256

    images = torch.rand(2, 3, 32, 32)
    quiet = Moderator(moderator.policy, encoder)
    assert [d.image_sha256 for d in quiet.moderate(images).decisions] == [None, None]
    quiet.hash_images = True
    hashes = [d.image_sha256 for d in quiet.moderate(images).decisions]
    assert hashes == [image_sha256(images[0]), image_sha256(images[1])]
