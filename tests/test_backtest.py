"""`moderation policy backtest` on a log written by the engine (tests/backtest_factory.py says
what every image is and what each candidate must do with it), on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from sqlalchemy import select

from moderation.cli import main
from moderation.lifecycle.backtest import backtest, embedding_cosines, load_candidate
from moderation.lifecycle.history import Filters
from moderation.storage import db as storage_db
from moderation.storage.models import DecisionRow
from tests.backtest_factory import (
    NEW_CONCEPT,
    THRESHOLD_MOVED,
    log_history,
    other_model_policy,
    write_policy,
)

SKIPPED = {"error_verdict": 1, "no_embedding": 1, "other_model": 1}


@pytest.fixture
def history(tmp_path, tiny_clip_dir, db_url):
    return log_history(tmp_path, tiny_clip_dir, db_url)


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(main, ["policy", "backtest", *args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def run_json(*args: str) -> dict:
    return json.loads(run(*args, "--json").stdout)


def ids(history, *images: int) -> list[str]:
    return [history.decisions[i].decision_id for i in images]


def test_an_identical_candidate_changes_nothing(history, db_url):
    data = run_json(str(history.policy_path), "--db", db_url)
    assert data["candidate"]["digest"] == history.policy.digest
    assert (data["decisions"], data["scored"], data["skipped"]) == (15, 12, SKIPPED)
    assert data["changed"] == 0
    assert data["transitions"] == {
        "blur->blur": 5,
        "allow->allow": 3,
        "review->review": 3,
        "blackout->blackout": 1,
    }
    assert sum(data["transitions"].values()) == 12
    assert {k: v for k, v in data["concepts"].items()} == {
        "nudity": {"before": 5, "after": 5},
        "gore": {"before": 1, "after": 1},
    }
    assert data["special_care"] == {"minor": {"before": 2, "after": 2}}
    assert data["reviewed"] == {
        # One approved image was a `flag` verdict; the other went to review (verdict review),
        # which is a question to a person, not a block: it is not counted as flagged.
        "approved": {"total": 2, "now_flagged": 1, "was_flagged": 1},
        "rejected": {"total": 1, "now_allowed": 0, "was_allowed": 0},
    }
    assert data["rescored_concepts"] == []


def test_a_moved_threshold_changes_exactly_the_decisions_that_cross_it(
    history, db_url, tmp_path, tiny_clip_dir
):
    moved = write_policy(tmp_path / "candidates", tiny_clip_dir, THRESHOLD_MOVED, "moved.yaml")
    data = run_json(str(moved), "--db", db_url, "--examples", "1")
    assert data["candidate"]["version"] == "2" and data["candidate"]["model"]
    assert (data["decisions"], data["scored"], data["skipped"]) == (15, 12, SKIPPED)
    assert data["changed"] == 5
    assert data["transitions"] == {
        "blur->review": 2,
        "review->allow": 2,
        "blur->allow": 1,
        "allow->allow": 3,
        "blur->blur": 2,
        "blackout->blackout": 1,
        "review->review": 1,
    }
    assert data["verdicts"] == {
        "flag->review": 2,
        "review->allow": 2,
        "flag->allow": 1,
        "flag->flag": 3,
        "allow->allow": 3,
        "review->review": 1,
    }
    assert data["concepts"] == {
        "nudity": {"before": 5, "after": 2},
        "gore": {"before": 1, "after": 1},
    }
    assert data["special_care"] == {"minor": {"before": 2, "after": 2}}
    assert data["reviewed"] == {
        # the approved flag becomes a review: no longer flagged (a review is not a block)
        "approved": {"total": 2, "now_flagged": 0, "was_flagged": 1},
        "rejected": {"total": 1, "now_allowed": 1, "was_allowed": 0},
    }
    # one example per transition, the oldest: ids are time-ordered, one batch shares a time
    assert data["examples"]["blur->review"] == ids(history, 4)
    assert data["examples"]["review->allow"] == ids(history, 1)
    assert data["examples"]["blur->allow"] == ids(history, 3)
    full = run_json(str(moved), "--db", db_url)
    assert full["examples"]["blur->review"] == ids(history, 4, 8)
    assert full["examples"]["allow->allow"] == ids(history, 0, 10, 11)
    for transition, examples in full["examples"].items():
        assert data["examples"][transition] == examples[:1]
    assert full["rescored_concepts"] == []  # every cosine was the logged one

    text = run(str(moved), "--db", db_url).stdout
    assert "changed action: 5 of 12" in text and "blur" in text and ids(history, 4)[0] in text
    assert "rejected by a reviewer: 1; allowed as logged 0, by the candidate 1" in text


def test_the_logged_policy_itself_reuses_its_cosines_in_a_log_without_vector_digests(
    history, db_url
):
    # A log written before policies recorded a digest of each concept vector.
    from moderation.storage.models import PolicyRow

    engine = storage_db.engine_for(db_url)
    with engine.begin() as conn:
        for row in conn.execute(
            select(PolicyRow.digest, PolicyRow.concepts, PolicyRow.special_concepts)
        ):
            strip = [[{k: v for k, v in c.items() if k != "vector"} for c in cs] for cs in row[1:]]
            conn.execute(
                PolicyRow.__table__.update()
                .where(PolicyRow.digest == row.digest)
                .values(concepts=strip[0], special_concepts=strip[1])
            )
    data = run_json(str(history.policy_path), "--db", db_url)
    assert data["changed"] == 0 and data["rescored_concepts"] == []


def test_a_compiled_artifact_needs_no_model(history, db_url, tmp_path, tiny_clip_dir):
    moved = write_policy(tmp_path / "candidates", tiny_clip_dir, THRESHOLD_MOVED, "moved.yaml")
    artifact = tmp_path / "moved.compiled.safetensors"
    load_candidate(moved).save(artifact)
    data = run_json(str(artifact), "--db", db_url)
    assert data["changed"] == 5 and data["scored"] == 12


def test_new_concepts_are_rescored_from_embeddings(history, db_url, tmp_path, tiny_clip_dir):
    new = write_policy(tmp_path / "candidates", tiny_clip_dir, NEW_CONCEPT, "new.yaml")
    data = run_json(str(new), "--db", db_url)
    assert data["rescored_concepts"] == ["weapons"]
    assert data["concepts"]["weapons"] == {"before": 0, "after": 1}  # 0.50 fires, 0.40 does not
    assert data["transitions"]["allow->blackout"] == 1
    assert data["examples"]["allow->blackout"] == ids(history, 10)
    assert data["changed"] == 1
    assert data["concepts"]["nudity"] == {"before": 5, "after": 5}


def test_rescored_cosines_match_float32_within_float16_tolerance(history, db_url):
    """Cosines scored from the stored float16 views against a float32 recomputation from the
    engine's own float32 embeddings (the maximum over views included)."""
    policy = history.policy
    kept = [d for d in history.decisions[:12] if d.verdict != "error"]
    with storage_db.engine_for(db_url).connect() as conn:
        stored = dict(
            conn.execute(
                select(DecisionRow.id, DecisionRow.embedding).where(
                    DecisionRow.id.in_([d.decision_id for d in kept])
                )
            ).all()
        )
    blobs = [stored[d.decision_id] for d in kept]
    counts = [len(d.embedding) for d in kept]
    assert max(counts) == 2  # a multi-view image is among them
    matrix = torch.cat([policy.concept_matrix, policy.special_matrix]).float()
    got, finite = embedding_cosines(blobs, counts, policy.embed_dim, matrix)
    assert finite.all()
    for row, d in zip(got, kept, strict=True):
        exact = F.normalize(torch.from_numpy(np.asarray(d.embedding, np.float32))) @ matrix.t()
        np.testing.assert_allclose(row, exact.max(dim=0).values.numpy(), atol=2e-3)
        np.testing.assert_allclose(row[:2], d.cosines, atol=2e-3)


def test_a_candidate_of_another_model_skips_everything(history, db_url, tmp_path):
    artifact = tmp_path / "third.compiled.safetensors"
    other_model_policy(history.policy_path, "third/model").save(artifact)
    data = run_json(str(artifact), "--db", db_url)
    assert (data["decisions"], data["scored"]) == (15, 0)
    assert data["skipped"] == {"other_model": 15}
    assert data["changed"] == 0 and data["transitions"] == {} and data["examples"] == {}


def test_filters(history, db_url, tmp_path, tiny_clip_dir):
    moved = write_policy(tmp_path / "candidates", tiny_clip_dir, THRESHOLD_MOVED, "moved.yaml")
    between = history.between.isoformat()
    before = run_json(str(moved), "--db", db_url, "--until", between)
    assert (before["decisions"], before["scored"], before["changed"]) == (10, 10, 5)
    assert before["filters"]["until"] == history.between.isoformat()
    after = run_json(str(moved), "--db", db_url, "--since", between)
    assert (after["decisions"], after["skipped"], after["changed"]) == (5, SKIPPED, 0)
    limited = run_json(str(moved), "--db", db_url, "--limit", "4")
    assert limited["decisions"] == 4
    assert limited["transitions"] == {"review->allow": 2, "blur->allow": 1, "allow->allow": 1}
    other = other_model_policy(history.policy_path)
    by_digest = run_json(str(moved), "--db", db_url, "--policy", other.digest[:10])
    assert (by_digest["decisions"], by_digest["skipped"]) == (1, {"other_model": 1})
    by_name = run_json(str(moved), "--db", db_url, "--policy", "bt")  # both "bt" policies
    assert by_name["decisions"] == 15
    empty = run_json(str(moved), "--db", db_url, "--since", "2000-01-01", "--until", "2000-01-02")
    assert (empty["decisions"], empty["changed"], empty["transitions"]) == (0, 0, {})


def test_small_chunks_give_the_same_report(history, db_url, tmp_path, tiny_clip_dir):
    new = write_policy(tmp_path / "candidates", tiny_clip_dir, NEW_CONCEPT, "new.yaml")
    candidate = load_candidate(new)
    sizes: list[int] = []
    small = backtest(candidate, db=db_url, chunk=2, on_chunk=sizes.append)
    assert sizes == [2] * 7 + [1]  # 15 decisions, 2 per query: memory is bounded by the chunk
    assert small == backtest(candidate, db=db_url)
    limited = backtest(candidate, db=db_url, chunk=3, filters=Filters(limit=7))
    assert limited == backtest(candidate, db=db_url, filters=Filters(limit=7))
    assert limited["decisions"] == 7


def test_bad_input_is_one_line(history, db_url, tmp_path):
    path = str(history.policy_path)
    for args, message in [
        (["--policy", "nope"], "no logged policy is named 'nope'"),
        (["--since", "yesterday"], 'invalid since "yesterday"'),
        (["--until", "5x"], 'invalid until "5x"'),
    ]:
        result = run(path, "--db", db_url, *args, code=1)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    missing = run(path, "--db", f"sqlite:///{tmp_path / 'none.db'}", code=1)
    assert "no database at" in missing.stderr
    nofile = run(str(tmp_path / "nope.yaml"), "--db", db_url, code=1)
    assert "cannot read candidate" in nofile.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: [\n", encoding="utf-8")
    assert len(run(str(bad), "--db", db_url, code=1).stderr.strip().splitlines()) >= 1
    assert run("--help").stdout.count("--examples") == 1


def test_a_cosine_on_the_threshold_is_the_logged_one(history, db_url, tmp_path):
    """An image whose float32 cosine is on one side of nudity's 0.30 and whose float16 embedding
    scores on the other: rescored, it would flip between blur and review with nothing changed."""
    from moderation.engine import Moderator
    from moderation.storage.log import DecisionLog
    from tests.backtest_factory import NUDITY, vec

    policy, matrix = history.policy, history.policy.concept_matrix.float()
    threshold = float(policy.thresholds[0])
    for value in np.linspace(0.29990, 0.30010, 81):
        image = vec({NUDITY: float(value)})
        exact = Moderator(policy).moderate_embeddings(torch.from_numpy(image[None]))[0]
        half, _ = embedding_cosines([image.astype("<f2").tobytes()], [1], len(image), matrix)
        if (exact.cosines[0] > threshold) != (half[0, 0] > threshold):
            break
    else:
        pytest.fail("no value in range puts float16 and float32 on both sides of 0.30")
    with DecisionLog(db_url, spool_dir=tmp_path / "s2", held_dir=tmp_path / "h2") as log:
        logged = Moderator(policy, log=log).moderate_embeddings(torch.from_numpy(image[None]))
        log.flush()
    action = logged[0].action
    assert action == ("blur" if exact.cosines[0] > threshold else "review")
    data = run_json(str(history.policy_path), "--db", db_url)
    assert data["changed"] == 0 and data["scored"] == 13
    assert data["transitions"][f"{action}->{action}"] == {"blur": 6, "review": 4}[action]
