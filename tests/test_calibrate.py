"""`moderation policy calibrate` on decisions the engine logged from engineered embeddings.

Every label's value is known (tests/calibration_factory.py), so the confusion counts at the current
threshold and the best threshold for a target are known too:

nudity (threshold 0.3, review band 0.02), cosines and verdicts:
    0.40 0.38 0.36 0.34  rejected (shows nudity)   -> fired: 4 true positives
    0.35 0.33 0.32 0.31  approved (false alarms)   -> fired: 4 false positives
    0.295                rejected (near miss)      -> not fired: 1 false negative
    0.29 0.285           approved                  -> not fired: 2 true negatives
gore (default threshold 0.3): 0.40 0.40 rejected, 0.32 approved (a false alarm)
minor (special care, 0.25): five approved images at 0.30 (an approval keeps special care shown)

Every other decision of the policy is a negative for the concepts it does not show, so nudity
has 5 positives and 4 + 2 + 3 (gore) + 5 (minor) = 14 negatives. One approval (0.35) is under
appeal, so 13 negatives count. With precision >= 0.75 the best recall for nudity is the cut just
below 0.34 (TP 4, FP 0; below 0.33 is 4 and 1, and 0.295 costs 3 more false positives): 0.335.
"""

from __future__ import annotations

import difflib
import json

import pytest
from click.testing import CliRunner

from moderation.cli import main
from moderation.review.queue import ReviewQueue
from tests.calibration_factory import GORE, MINOR, NUDITY, Log, embedding, write_policy

REJECT, APPROVE = "reject", "approve"
NUDITY_LABELS = [
    (0.40, REJECT), (0.38, REJECT), (0.36, REJECT), (0.34, REJECT),
    (0.35, APPROVE), (0.33, APPROVE), (0.32, APPROVE), (0.31, APPROVE),
    (0.295, REJECT), (0.29, APPROVE), (0.285, APPROVE),
]  # fmt: skip


def review(queue: ReviewQueue, decisions, verdicts) -> None:
    items = {i.decision_id: i.id for i in queue.list(limit=1000)}
    for decision, verdict in zip(decisions, verdicts, strict=True):
        item = items.get(decision.decision_id)
        assert (item is None) == (decision.action == "allow")
        if verdict == REJECT:
            queue.reject(item, "alice", reason="shows it")
        elif verdict == APPROVE:
            queue.approve(item, "alice")


@pytest.fixture
def labelled(tmp_path, tiny_clip_dir, encoder, db_url):
    """The policy file and a log holding the labels described above (plus unlabelled ones)."""
    policy = write_policy(tmp_path / "policies", tiny_clip_dir)
    log = Log(policy, encoder, db_url, tmp_path)
    queue = ReviewQueue(db_url)
    cases = [(embedding({NUDITY: c}), v) for c, v in NUDITY_LABELS]
    cases += [(embedding({GORE: 0.40}), REJECT)] * 2 + [(embedding({GORE: 0.32}), APPROVE)]
    cases += [(embedding({MINOR: 0.30}), APPROVE)] * 5
    cases += [(embedding({NUDITY: 0.45}), None)]  # awaiting review: no label
    cases += [(embedding({NUDITY: 0.1}), None)] * 3  # allowed: never reviewed
    decisions = log.decide([e for e, _ in cases])
    review(queue, decisions, [v for _, v in cases])
    # An appeal of the false alarm at 0.35: while it waits, no verdict stands for it.
    appealed = next(i for i in queue.list(limit=1000) if i.decision_id == decisions[4].decision_id)
    queue.reopen(appealed.id, "bob", reason="appeal")
    log.close()
    return policy, queue, appealed


def calibrate(*args: str, code: int = 0):
    result = CliRunner().invoke(main, ["policy", "calibrate", *args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def calibrate_json(*args: str) -> dict:
    return json.loads(calibrate(*args, "--json").stdout)


def test_exact_counts_and_the_known_best_threshold(labelled, db_url):
    policy, queue, appealed = labelled
    (first,) = [c for c in queue.show(appealed.id)["concepts"] if c["index"] == 0]
    assert first["cosine"] == pytest.approx(0.35, abs=1e-3)
    data = calibrate_json(str(policy), "--db", db_url, "--target-precision", "0.75",
                          "--min-examples", "3")  # fmt: skip
    assert data["policy"]["name"] == "calib" and len(data["policy"]["digest"]) == 64
    assert data["labels"]["decisions"] == 18
    assert data["labels"]["skipped"] == {"awaiting_review": 1, "under_appeal": 1}
    nudity = data["concepts"]["nudity"]
    # the appealed approval at 0.35 does not count: 3 false positives at the current threshold
    assert (nudity["positives"], nudity["negatives"]) == (5, 13)
    current = {k: nudity["current"][k] for k in ("threshold", "tp", "fp", "fn", "tn")}
    assert current == {"threshold": 0.3, "tp": 4, "fp": 3, "fn": 1, "tn": 10}
    assert nudity["current"]["precision"] == pytest.approx(4 / 7)
    assert nudity["current"]["recall"] == pytest.approx(4 / 5)
    assert nudity["current"]["fpr"] == pytest.approx(3 / 13)
    low, high = nudity["current"]["recall_ci"]
    assert low < 0.8 < high  # Wilson: [0.376, 0.964] for 4 of 5
    assert (round(low, 3), round(high, 3)) == (0.376, 0.964)
    suggested = nudity["suggested"]
    assert suggested["threshold"] == 0.335 and suggested["changed"] is True
    assert {k: suggested[k] for k in ("tp", "fp", "fn", "tn")} == {
        "tp": 4,
        "fp": 0,
        "fn": 1,
        "tn": 13,
    }
    assert (suggested["precision"], suggested["recall"]) == (1.0, 0.8)
    assert nudity["refused"] is None


def test_the_latest_verdict_counts(labelled, db_url):
    policy, queue, appealed = labelled
    again = queue.list(status="pending", limit=10)
    new_item = next(i for i in again if i.decision_id == appealed.decision_id)
    queue.reject(new_item.id, "carol", reason="it does show nudity")
    data = calibrate_json(str(policy), "--db", db_url, "--min-examples", "3")
    nudity = data["concepts"]["nudity"]
    assert data["labels"]["skipped"] == {"awaiting_review": 1}
    assert data["labels"]["decisions"] == 19
    assert (nudity["positives"], nudity["negatives"]) == (6, 13)
    assert {k: nudity["current"][k] for k in ("tp", "fp", "fn", "tn")} == {
        "tp": 5, "fp": 3, "fn": 1, "tn": 10,
    }  # fmt: skip


def test_targets_refusals_and_special_care(labelled, db_url):
    policy, _, _ = labelled
    data = calibrate_json(str(policy), "--db", db_url, "--max-false-positive-rate", "0",
                          "--min-examples", "3")  # fmt: skip
    assert data["target"] == {"max_false_positive_rate": 0.0}
    nudity, gore, minor = (data["concepts"][n] for n in ("nudity", "gore", "minor"))
    assert nudity["suggested"]["threshold"] == 0.335  # 0.34 is the lowest with no negative above
    assert nudity["suggested"]["fpr"] == 0.0
    # gore: 2 positives at 0.40 and its false alarm at 0.32: too few positives for 3
    assert (gore["positives"], gore["negatives"]) == (2, 16)
    assert gore["refused"] == (
        "needs 1 more positive (--min-examples 3; has 2 positives, 16 negatives)"
    )
    assert gore["suggested"] is None and gore["current"]["fp"] == 1
    # special care: the five approved children are positives; 0.25 already separates them
    assert minor["special_care"] is True
    assert (minor["positives"], minor["negatives"]) == (5, 13)
    assert minor["current"]["tp"] == 5 and minor["current"]["fp"] == 0
    assert minor["suggested"]["threshold"] == 0.25 and minor["suggested"]["changed"] is False

    many = calibrate_json(str(policy), "--db", db_url)  # --min-examples 20 by default
    for name, concept in many["concepts"].items():
        assert concept["suggested"] is None, name
        assert concept["refused"].startswith("needs "), name
    assert many["concepts"]["nudity"]["refused"] == (
        "needs 15 more positives and 7 more negatives (--min-examples 20; "
        "has 5 positives, 13 negatives)"
    )
    unreachable = calibrate_json(str(policy), "--db", db_url, "--target-precision", "1",
                                 "--min-examples", "2")  # fmt: skip
    assert unreachable["concepts"]["gore"]["suggested"]["threshold"] == 0.36
    assert unreachable["concepts"]["nudity"]["suggested"]["threshold"] == 0.335


def test_out_changes_only_thresholds(labelled, db_url, tmp_path):
    policy, _, _ = labelled
    out = policy.parent / "calibrated.yaml"
    result = calibrate(str(policy), "--db", db_url, "--target-precision", "1", "--min-examples", "2",
                       "--out", str(out))  # fmt: skip
    assert f"Wrote {out}: 2 thresholds changed (nudity 0.3000 -> 0.335, gore 0.3000 -> 0.36)" in (
        result.output
    )
    diff = [
        line
        for line in difflib.unified_diff(
            policy.read_text().splitlines(), out.read_text().splitlines(), lineterm="", n=0
        )
        if not line.startswith(("---", "+++", "@@"))
    ]
    assert diff == [
        "-    threshold: 0.3   # calibrate me",
        "+    threshold: 0.335 # calibrate me",
        "+    threshold: 0.36",  # gore's threshold came from the defaults: a line of its own
    ]
    lines = out.read_text().splitlines()
    assert lines[lines.index("  - name: gore") + 1] == "    threshold: 0.36"
    again = calibrate_json(
        str(out), "--db", db_url, "--target-precision", "1", "--min-examples", "2"
    )
    assert again["concepts"]["nudity"]["current"]["threshold"] == 0.335
    assert again["concepts"]["nudity"]["suggested"]["changed"] is False


def test_text_report(labelled, db_url):
    policy, _, _ = labelled
    text = calibrate(str(policy), "--db", db_url, "--target-precision", "0.75",
                     "--min-examples", "3").output  # fmt: skip
    assert "Not counted: 1 awaiting review, 1 under appeal" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("CONCEPT"))
    assert lines[header].split() == [
        "CONCEPT", "POS", "NEG", "THRESHOLD", "TP", "FP", "FN", "TN",
        "PRECISION", "[95%", "CI]", "RECALL", "[95%", "CI]", "FPR", "[95%", "CI]",
    ]  # fmt: skip
    assert lines[header + 2].split()[:8] == ["nudity", "5", "13", "0.3", "(current)", "4", "3", "1"]
    assert lines[header + 3].split()[:6] == ["0.335", "(suggested)", "4", "0", "1", "13"]
    assert "gore: no suggestion: needs 1 more positive (--min-examples 3" in text


def test_usage_errors(labelled, db_url, tmp_path):
    policy, _, _ = labelled
    both = calibrate(str(policy), "--db", db_url, "--target-precision", "0.9",
                     "--max-false-positive-rate", "0.1", code=2)  # fmt: skip
    assert "give --target-precision or --max-false-positive-rate, not both" in both.output
    bad = calibrate(str(policy), "--positive", "nudity", code=2)
    assert "expected CONCEPT=DIR, got 'nudity'" in bad.output
    (tmp_path / "imgs").mkdir()
    unknown = calibrate(str(policy), "--positive", f"nudty={tmp_path / 'imgs'}", code=1)
    assert unknown.output == (
        "Error: --positive nudty=...: policy calib has no concept 'nudty' "
        "(it has: nudity, gore, minor)\n"
    )
    missing = calibrate(str(policy), "--db", f"sqlite:///{tmp_path / 'none.db'}", code=1)
    assert missing.output == (
        f"Error: no database at {tmp_path / 'none.db'} (sqlite:///{tmp_path / 'none.db'}); "
        "`moderation db upgrade --db URL` creates one\n"
    )
    assert not (tmp_path / "none.db").exists()
    garbled = calibrate(str(policy), "--db", "::::", code=1)
    assert garbled.output.startswith("Error: invalid database URL '::::': ")


def test_help_names_every_option():
    result = CliRunner().invoke(main, ["policy", "calibrate", "--help"])
    assert result.exit_code == 0
    for option in ("--db URL", "--positive CONCEPT=DIR", "--negative DIR", "--target-precision P",
                   "--max-false-positive-rate F", "--min-examples N", "--out NEW.yaml",
                   "--plot DIR", "--json"):  # fmt: skip
        assert option in result.output, option
    for command in (["review", "reject", "--help"], ["review", "approve", "--help"]):
        text = CliRunner().invoke(main, command).output
        assert "--concept NAME" in text and "--no-concepts" in text
