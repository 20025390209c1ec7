"""The engine's decisions, logged by the DecisionLog, flow through the review queue to `release`:
the held original is found where the log put it, whatever the reader's environment says."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import moderation.cli.review_cmds  # noqa: F401  (registers the review commands)
from moderation.cli import main
from moderation.engine import Moderator
from moderation.review import ReviewError
from moderation.review.queue import ReviewQueue
from moderation.storage import DecisionLog, HeldStore
from policy import compile_policy, load_policy


@pytest.fixture(scope="module")
def images():
    """Four smooth 64x64 images in [-1, 1], as a VAE decodes them."""
    torch.manual_seed(3)
    base = torch.rand(4, 3, 8, 8)
    return torch.nn.functional.interpolate(base, size=(64, 64), mode="bilinear") * 2 - 1


@pytest.fixture(scope="module")
def policy(tmp_path_factory, encoder, images):
    """Image 0 fires a review concept, image 1 a blur concept, image 2 special care; 3 is clean."""
    e = encoder.embed_images(images).float()

    def vector(i: int) -> str:
        return "[" + ", ".join(f"{v:.8f}" for v in e[i].tolist()) + "]"

    text = f"""\
policy: held-test
version: 1
review_band: 0
defaults: {{threshold: 0.999}}
concepts:
  - {{name: suspicious, embedding: {vector(0)}, action: review}}
  - {{name: rude, embedding: {vector(1)}, action: blur}}
special_care:
  adjustment: 0
  escalate: review
  concepts:
    - {{name: minor, embedding: {vector(2)}, threshold: 0.999}}
"""
    path = tmp_path_factory.mktemp("held-policy") / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    return compile_policy(load_policy(path), encoder, cache=False)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)  # [H, W, 3]


def shown_by_cli(db_url: str, item_id: int) -> list[str]:
    result = CliRunner().invoke(
        main, ["review", "show", str(item_id), "--db", db_url], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def test_logged_decisions_are_reviewed_and_released(
    db_url, tmp_path, monkeypatch, encoder, images, policy
):
    written, elsewhere = tmp_path / "A", tmp_path / "B"
    # The moderating process holds originals in A; every reader below is told B.
    monkeypatch.setenv("MODERATION_HELD_DIR", str(elsewhere))
    metadata = [{"prompt": f"prompt {i}"} for i in range(4)]
    log = DecisionLog(db_url, spool_dir=tmp_path / "spool", held_dir=written)
    with Moderator(policy, encoder, log=log) as moderator:
        decisions = moderator.moderate(images.clone(), metadata=metadata).decisions
    assert [d.action for d in decisions] == ["review", "blur", "review", "allow"]
    assert [d.needs_review for d in decisions] == [True, False, True, False]
    suspicious, minor = decisions[0], decisions[2]

    queue = ReviewQueue(db_url)
    items = {i.decision_id: i for i in queue.list()}
    assert list(items) == [minor.decision_id, suspicious.decision_id], "special care comes first"
    assert (items[minor.decision_id].priority, items[suspicious.decision_id].priority) == (1, 0)
    first, second = items[suspicious.decision_id].id, items[minor.decision_id].id

    shown = queue.show(first)
    held = shown["held_file"]  # the decision document (CHANGELOG, issue 14)
    files = sorted(str(p) for p in written.resolve().rglob("*.png"))
    assert len(files) == 2 and held in files  # the two queued images, and nothing else
    assert shown["held_path"] == held  # recorded as an absolute path
    assert not elsewhere.exists()
    assert f"  held image {held}" in shown_by_cli(db_url, first)
    assert shown["metadata"] == {"prompt": "prompt 0"}
    assert shown["image_sha256"] == suspicious.image_sha256
    concepts = sorted(shown["concepts"], key=lambda c: c["index"])  # listed nearest first
    assert [c["name"] for c in concepts] == ["suspicious", "rude"]
    assert [c["cosine"] for c in concepts] == pytest.approx(suspicious.cosines.tolist())
    assert [c["score"] for c in concepts] == pytest.approx(suspicious.scores.tolist())
    assert shown["events"][0]["event"] == "created"
    assert queue.show(second)["special_care"]["hits"] == ["minor"]

    reader = HeldStore(elsewhere)  # what a reviewer's process configured from its environment
    with pytest.raises(ReviewError, match="still awaiting review"):
        queue.release(suspicious.decision_id, reader)
    claims = {c.item_id: c for c in queue.claim("alice", 4)}
    queue.approve(first, "alice", token=claims[first].token)
    queue.reject(second, "alice", reason="a child", token=claims[second].token)
    png = queue.release(suspicious.decision_id, reader)
    assert png == open(held, "rb").read()
    expected = ((images[0] + 1) / 2 * 255).round().permute(1, 2, 0).numpy()  # [H, W, 3]
    assert np.abs(pixels(png) - expected).max() <= 1, "the held original is image 0"
    with DecisionLog(db_url, spool_dir=tmp_path / "spool2") as other:  # held folder: B
        from moderation.review.release import release_from_log

        with Moderator(policy, encoder, log=other) as elsewhere_moderator:
            assert release_from_log(elsewhere_moderator.log, suspicious.decision_id) == png
    with pytest.raises(ReviewError, match="was rejected by alice: a child"):
        queue.release(minor.decision_id, reader)

    # An appeal puts the newest item back in the queue: the original is held again.
    queue.reopen(first, "bob", reason="appeal")
    with pytest.raises(ReviewError, match="still awaiting review"):
        queue.release(suspicious.decision_id, reader)
    assert queue.stats()["queue"] == {"pending": 1, "claimed": 0, "approved": 1, "rejected": 1}
