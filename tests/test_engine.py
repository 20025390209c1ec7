"""Moderator end to end on a tiny CLIP: decisions, actions, fail-closed errors, logging, release."""

from __future__ import annotations

import dataclasses
import json
import sqlite3

import numpy as np
import pytest
import torch

from moderation.engine import Moderator
from policy import PolicyError, compile_policy, load_policy


@pytest.fixture(scope="module")
def images():
    """Six smooth 64x64 images in [-1, 1], as a VAE decodes them."""
    torch.manual_seed(1)
    base = torch.rand(6, 3, 8, 8)
    return torch.nn.functional.interpolate(base, size=(64, 64), mode="bilinear") * 2 - 1


def write_policy(tmp_path, encoder, images, *, actions, extra=""):
    """A policy whose concept i is image i's own embedding (so exactly image i fires it)."""
    embeddings = encoder.embed_images(images[: len(actions)]).float()
    lines = ["policy: engine-test", "version: 3", "defaults: {threshold: 0.999}", "concepts:"]
    for i, action in enumerate(actions):
        vector = ", ".join(f"{v:.8f}" for v in embeddings[i].tolist())
        lines += [f"  - name: c{i}", f"    embedding: [{vector}]", f"    action: {action}"]
    path = tmp_path / "policy.yaml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return compile_policy(load_policy(path), encoder)


def test_each_image_gets_its_concepts_action(tmp_path, encoder, images):
    policy = write_policy(tmp_path, encoder, images, actions=["blackout", "blur", "review"])
    moderator = Moderator(policy, encoder)
    result = moderator.moderate(images.clone())
    verdicts = [d.verdict for d in result.decisions]
    actions = [d.action for d in result.decisions]
    assert actions == ["blackout", "blur", "review", "allow", "allow", "allow"]
    assert verdicts == ["flag", "flag", "review", "allow", "allow", "allow"]
    assert [d.fired for d in result.decisions[:3]] == [("c0",), ("c1",), ("c2",)]
    assert result.decisions[0].top_concept == "c0"
    assert result.decisions[0].margin == pytest.approx(1 - 0.999, abs=1e-4)
    out = result.images
    assert isinstance(out, torch.Tensor) and out.shape == images.shape
    assert torch.equal(out[0], torch.full_like(out[0], -1.0))  # black in the caller's [-1,1]
    assert not torch.equal(out[1], images[1]) and out[1].std() < images[1].std()
    assert torch.equal(out[3:], images[3:])  # allowed images come back bit for bit


def test_nan_image_fails_closed(tmp_path, encoder, images):
    policy = write_policy(tmp_path, encoder, images, actions=["blur"])
    batch = images[:3].clone()
    batch[1, 0, 5, 5] = float("nan")
    result = Moderator(policy, encoder).moderate(batch)
    bad = result.decisions[1]
    assert (bad.verdict, bad.action) == ("error", "blackout")
    assert "NaN" in bad.error
    assert torch.equal(result.images[1], torch.full_like(result.images[1], -1.0))
    assert result.decisions[2].verdict == "allow"


def test_encoder_failure_fails_closed_for_the_whole_batch(tmp_path, encoder, images, monkeypatch):
    policy = write_policy(tmp_path, encoder, images, actions=["blur"])
    moderator = Moderator(policy, encoder)

    def broken(pixel_values):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(moderator.encoder, "encode_image", broken)
    result = moderator.moderate(images[:2].clone())
    assert [(d.verdict, d.action) for d in result.decisions] == [("error", "blackout")] * 2
    assert "CUDA out of memory" in result.decisions[0].error
    assert torch.all(result.images == -1)


def test_empty_batch(tmp_path, encoder, images):
    policy = write_policy(tmp_path, encoder, images, actions=["blur"])
    result = Moderator(policy, encoder).moderate(images[:0])
    assert result.decisions == [] and result.images.shape[0] == 0


def test_numpy_and_pil_inputs_come_back_in_kind(tmp_path, encoder, images):
    from PIL import Image

    policy = write_policy(tmp_path, encoder, images, actions=["blackout"])
    moderator = Moderator(policy, encoder)
    hwc = ((images[:2] + 1) / 2).permute(0, 2, 3, 1).numpy()  # [2,H,W,3] in [0,1]
    result = moderator.moderate(hwc)
    assert isinstance(result.images, np.ndarray) and result.images.shape == hwc.shape
    pil = Image.fromarray((hwc[1] * 255).astype(np.uint8))
    result = moderator.moderate([pil])
    assert isinstance(result.images[0], Image.Image)


def test_decisions_are_logged_and_held_images_released_after_approval(tmp_path, encoder, images):
    from moderation.review import ReviewError, ReviewQueue
    from moderation.review.release import release
    from moderation.storage import DecisionLog

    url = f"sqlite:///{tmp_path / 'm.db'}"
    policy = write_policy(tmp_path, encoder, images, actions=["blackout", "review"])
    log = DecisionLog(url, spool_dir=tmp_path / "spool", held_dir=tmp_path / "held")
    with Moderator(policy, encoder, log=log) as moderator:
        result = moderator.moderate(images[:4].clone(), metadata={"prompt": "p", "seed": 7})
        held = result.decisions[1]
        assert held.action == "review"
        with pytest.raises(ReviewError, match="still awaiting review"):
            release(url, tmp_path / "held", held.decision_id)  # pending: not yet
        queue = ReviewQueue(url)
        [claim] = queue.claim("alice")
        assert claim.decision_id == held.decision_id
        queue.approve(claim.item_id, "alice", token=claim.token)
        png = release(url, tmp_path / "held", held.decision_id)
        assert png.startswith(b"\x89PNG")
    with sqlite3.connect(tmp_path / "m.db") as db:
        rows = db.execute(
            "select verdict, action, meta from decisions order by created_at"
        ).fetchall()
        assert sorted(r[1] for r in rows) == ["allow", "allow", "blackout", "review"]
        assert all(json.loads(r[2]) == {"prompt": "p", "seed": 7} for r in rows)
        assert db.execute("select count(*) from policies").fetchone() == (1,)


def test_database_down_1000_images_moderated_then_replayed(tmp_path, encoder, images):
    """With the database unreachable, moderation goes on (actions applied) and nothing is lost."""
    from moderation.storage import DecisionLog

    small = images[:4, :, :32, :32]
    policy = write_policy(tmp_path, encoder, small, actions=["blackout"])
    spool = tmp_path / "spool"
    url = f"sqlite:///{tmp_path / 'later' / 'up.db'}"  # unreachable until its folder exists
    down = DecisionLog(url, spool_dir=spool)
    batch = small.repeat(25, 1, 1, 1)  # 100 small images per call
    ids = []
    with Moderator(policy, encoder, log=down) as moderator:
        for _ in range(10):
            result = moderator.moderate(batch.clone())
            assert (result.unrecorded, result.log_error) == ([], None)  # spooled is recorded
            ids += [d.decision_id for d in result.decisions]
            flagged = [i for i, d in enumerate(result.decisions) if d.action == "blackout"]
            assert flagged and torch.all(result.images[flagged] == -1)
    assert len(set(ids)) == 1000 and down.counts.spooled == 1000
    (tmp_path / "later").mkdir()
    up = DecisionLog(url, spool_dir=spool)
    assert up.replay() == 1000
    assert up.replay() == 0
    up.close()
    with sqlite3.connect(tmp_path / "later" / "up.db") as db:
        assert db.execute("select count(*) from decisions").fetchone() == (1000,)
        stored = {r[0] for r in db.execute("select id from decisions")}
    assert stored == set(ids)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda x: x.to("meta"),
            "images: a tensor on the meta device holds no pixel values to judge",
        ),
        (
            lambda x: [x[0].to("meta")],
            "image 0: a tensor on the meta device holds no pixel values to judge",
        ),
        (
            lambda x: x.to_sparse(),
            "images: a sparse_coo tensor holds no dense pixels; pass x.to_dense() instead",
        ),
        (
            lambda x: [x[0].to_sparse()],
            "image 0: a sparse_coo tensor holds no dense pixels; pass x.to_dense() instead",
        ),
        (
            lambda x: x[0, 0].to_sparse_csr(),
            "images: a sparse_csr tensor holds no dense pixels; pass x.to_dense() instead",
        ),
        (
            lambda x: torch.nested.nested_tensor(list(x)),
            "images: a nested tensor; pass a list of [3,H,W] tensors instead",
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:.*(CSR|nested).*:UserWarning")  # torch's beta notices
def test_tensors_without_dense_pixels_are_one_clear_error(tmp_path, encoder, images, make, message):
    """Regression: meta and sparse tensors raised a raw NotImplementedError from deep in torch."""
    from moderation.errors import ModerationError
    from moderation.image_files import ImageInputError

    moderator = Moderator(write_policy(tmp_path, encoder, images, actions=["blur"]), encoder)
    for call in (moderator.moderate, encoder.embed_images):
        with pytest.raises(ImageInputError) as caught:
            call(make(images[:2].clone()))
        assert str(caught.value) == message and isinstance(caught.value, ModerationError)


def test_from_policy_pins_the_digest_of_a_compiled_artifact(
    tmp_path, tiny_clip_dir, encoder, images
):
    from moderation.errors import ModerationError

    policy = write_policy(tmp_path, encoder, images, actions=["blur"])
    artifact = tmp_path / "policy.safetensors"
    policy.save(artifact)
    pinned = Moderator.from_policy(artifact, model=tiny_clip_dir, expect_digest=policy.digest)
    assert pinned.policy.digest == policy.digest
    other = "0" * 64
    with pytest.raises(ModerationError) as caught:
        Moderator.from_policy(artifact, model=tiny_clip_dir, expect_digest=other)
    assert str(caught.value) == (
        f"policy 'engine-test': digest {policy.digest[:12]} is not the expected 000000000000: "
        "refusing to judge images with it"
    )
    with pytest.raises(ModerationError, match="is not a full sha256 digest"):
        Moderator.from_policy(artifact, model=tiny_clip_dir, expect_digest="abc")


def test_every_logged_decision_names_its_encoder(tmp_path, encoder, images):
    from moderation.storage import DecisionLog

    url = f"sqlite:///{tmp_path / 'm.db'}"
    policy = write_policy(tmp_path, encoder, images, actions=["blackout"])
    log = DecisionLog(url, spool_dir=tmp_path / "spool", held_dir=tmp_path / "held")
    with Moderator(policy, encoder, log=log) as moderator:
        decisions = moderator.moderate(images[:2].clone()).decisions
        u8 = moderator.moderate((images[:1] * 127 + 128).to(torch.uint8)).decisions
        given = moderator.moderate_embeddings(torch.randn(1, encoder.embed_dim))
    assert len(encoder.digest) == 64
    assert [d.encoder_digest for d in decisions + u8] == [encoder.digest] * 3
    assert [d.value_range for d in decisions + u8] == ["-1,1", "-1,1", None]
    assert given[0].encoder_digest is None  # embeddings the caller made: no tower of ours
    assert decisions[0].to_dict()["encoder_digest"] == encoder.digest
    with sqlite3.connect(tmp_path / "m.db") as db:
        rows = db.execute("select encoder_digest, value_range from decisions").fetchall()
    assert sorted(rows, key=str) == sorted(
        [(encoder.digest, "-1,1")] * 2 + [(encoder.digest, None), (None, None)], key=str
    )


def test_a_policy_forced_to_show_held_images_as_they_are_still_hides_them(
    tmp_path, encoder, images
):
    """Regression: the compiled rules refuse `review_placeholder: allow`, but `apply_actions`
    accepted it, so a policy object changed after it was built (or built around the rules)
    handed back the original while it waited for review."""
    policy = write_policy(tmp_path, encoder, images, actions=["review"])
    with pytest.raises(PolicyError, match="review_placeholder"):
        dataclasses.replace(policy, review_placeholder="allow")
    moderator = Moderator(policy, encoder)  # (which checks the policy again)
    object.__setattr__(moderator.policy, "review_placeholder", "allow")  # past every check
    result = moderator.moderate(images[:2].clone())
    assert [d.action for d in result.decisions] == ["review", "allow"]
    assert torch.equal(result.images[0], torch.full_like(images[0], -1.0))  # blacked out
    assert torch.equal(result.images[1], images[1])
