"""A pipeline's checker built with `from_policy(..., db=...)`: every image logged (SQLite and
PostgreSQL), review items in `moderation review list`, held originals released after approval,
and failures logged as error decisions."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import select

from moderation.cli import main
from moderation.images import image_sha256
from moderation.integrations.diffusers import PolicySafetyChecker
from moderation.review import ReviewError
from moderation.storage import db
from moderation.storage.models import DecisionRow
from moderation.synthetic import make_tiny_pipeline
from tests.test_pipeline import PROMPT, generate


def write_policy(path, direction, threshold, action, on_error="blackout"):
    doc = {
        "policy": "pipeline-log",
        "version": 1,
        "on_error": on_error,
        "concepts": [
            {
                "name": "dolphin",
                "embedding": [float(v) for v in direction],
                "threshold": float(threshold),
                "action": action,
            }
        ],
    }
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def setup(tiny_clip_dir, tmp_path_factory):
    """The pipeline, its unmoderated output and a policy (YAML) that sends image 0 to review."""
    folder = tmp_path_factory.mktemp("pipeline-log")
    probe_yaml = write_policy(folder / "probe.yaml", np.ones(32), 0.99, "blackout")
    probe = PolicySafetyChecker.from_policy(probe_yaml, model=tiny_clip_dir, device="cpu")
    pipe = make_tiny_pipeline(safety_checker=probe)
    plain = generate(pipe)
    assert plain.nsfw_content_detected == [False, False]
    e0, e1 = (d.embedding[0] / np.linalg.norm(d.embedding[0]) for d in probe.last_decisions)
    direction = e0 - e1
    cos = [float(e @ direction / np.linalg.norm(direction)) for e in (e0, e1)]
    assert cos[0] > cos[1] + 0.05
    threshold = (cos[0] + cos[1]) / 2
    return {
        "pipe": pipe,
        "model": tiny_clip_dir,
        "plain": plain.images,
        "review": write_policy(folder / "review.yaml", direction, threshold, "review"),
    }


def checker_for(setup, db_url, tmp_path, policy=None):
    checker = PolicySafetyChecker.from_policy(
        policy or setup["review"],
        model=setup["model"],
        device="cpu",
        db=db_url,
        held_dir=tmp_path / "held",
        spool_dir=tmp_path / "spool",
    )
    setup["pipe"].safety_checker = checker
    return checker


def logged(url) -> dict[str, DecisionRow]:
    with db.engine_for(url).connect() as conn:
        return {row.id: row for row in conn.execute(select(DecisionRow.__table__))}


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def as_uint8(image: np.ndarray) -> np.ndarray:
    """What a viewer gets from a [0, 1] float image (diffusers' numpy_to_pil rounding)."""
    return (image * 255).round().astype(np.uint8)


def test_every_image_is_logged_reviewed_and_released(setup, db_url, tmp_path):
    checker = checker_for(setup, db_url, tmp_path)
    with checker.caller(prompt=PROMPT, seed=0, user="alice"):
        out = generate(setup["pipe"])
    assert out.nsfw_content_detected == [True, False]
    first, second = checker.last_decisions
    assert (first.verdict, second.verdict) == ("review", "allow")

    rows = logged(db_url)
    assert set(rows) == {first.decision_id, second.decision_id}  # one row per image, same ids
    for decision, plain in zip(checker.last_decisions, setup["plain"], strict=True):
        row = rows[decision.decision_id]
        assert (row.verdict, row.action, row.policy_digest) == (
            decision.verdict,
            decision.action,
            checker.policy.digest,
        )
        assert row.meta == {"prompt": PROMPT, "seed": 0, "user": "alice"}
        # The hash is of the image the pipeline shows (VAE output denormalised and clamped).
        assert row.image_sha256 == image_sha256(torch.from_numpy(plain).permute(2, 0, 1))
    assert rows[first.decision_id].held_path and rows[second.decision_id].held_path is None

    items = json.loads(cli("review", "list", "--db", db_url, "--json"))
    assert [item["decision_id"] for item in items] == [first.decision_id]
    with pytest.raises(ReviewError, match="still awaiting review"):
        checker.release(first.decision_id)
    cli("review", "approve", str(items[0]["id"]), "--reviewer", "bob", "--db", db_url)
    released = np.asarray(Image.open(io.BytesIO(checker.release(first.decision_id))))
    assert np.array_equal(released, as_uint8(setup["plain"][0]))  # the original, as produced
    assert not np.array_equal(as_uint8(out.images[0]), released)  # the caller got a placeholder
    checker.close()


def test_an_encoder_that_raises_is_logged_as_an_error(setup, db_url, tmp_path):
    checker = checker_for(setup, db_url, tmp_path)

    def on_fire(module, args):
        raise RuntimeError("the vision tower is on fire")

    hook = checker.encoder.vision_model.register_forward_pre_hook(on_fire)
    try:
        with checker.caller(user="carol"):
            out = generate(setup["pipe"])
    finally:
        hook.remove()
        checker.close()
    assert out.nsfw_content_detected == [True, True]
    assert (out.images == 0).all()  # on_error: blackout, both images
    rows = logged(db_url)
    assert {d.decision_id for d in checker.last_decisions} == set(rows)
    assert [(r.verdict, r.action, r.error, r.meta) for r in rows.values()] == [
        ("error", "blackout", "RuntimeError: the vision tower is on fire", {"user": "carol"})
    ] * 2


def test_metadata_the_log_cannot_store_fails_closed_and_is_logged(setup, tmp_path):
    url = f"sqlite:///{tmp_path}/moderation.db"
    checker = checker_for(setup, url, tmp_path)
    checker.metadata = {"prompt": PROMPT, "when": object()}
    out = generate(setup["pipe"])
    checker.close()
    assert out.nsfw_content_detected == [True, True]
    assert (out.images == 0).all()
    rows = logged(url)
    assert {d.decision_id for d in checker.last_decisions} == set(rows)
    assert [(r.verdict, r.action, r.meta) for r in rows.values()] == [("error", "blackout", {})] * 2
    assert all(
        "cannot be stored as JSON: object is not JSON serializable" in r.error
        for r in rows.values()
    )


def test_decisions_that_cannot_be_recorded_are_named(setup, tmp_path):
    """A log that cannot record (closed here) loses no decision silently: the checker names them."""
    url = f"sqlite:///{tmp_path}/moderation.db"
    checker = checker_for(setup, url, tmp_path)
    checker.moderator.log.close()
    out = generate(setup["pipe"])
    assert out.nsfw_content_detected == [True, False]  # moderated all the same
    assert checker.last_unrecorded == [d.decision_id for d in checker.last_decisions]
    assert logged(url) == {}
