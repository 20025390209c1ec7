"""One decision document: every command's JSON validates against docs/decision.schema.json, and
one decision reads the same through `check --json`, `decisions show --json` and `review show
--json` (issue 14); `review show` explains as much as `decisions show` (issue 19 item 9)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from moderation.cli import main
from moderation.storage import db
from tests.decisions_factory import Logged, candidate_policy, seed
from tests.pg import BACKENDS, scratch_url

SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "decision.schema.json").read_text())
# What only the log knows about a decision: a check prints it before any review exists.
READ_SIDE_ONLY = {"review", "labels", "held_path", "held_file"}


def validator(definition: str = "document") -> jsonschema.Draft202012Validator:
    schema = {**SCHEMA, "$ref": f"#/$defs/{definition}"}
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def valid(value, definition: str = "document") -> None:
    errors = sorted(validator(definition).iter_errors(value), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:5]]


def run(*args, code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def run_json(*args):
    return json.loads(run(*args, "--json").stdout)


def test_the_schema_is_a_valid_schema_and_can_fail():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    with pytest.raises(AssertionError):
        valid({"decision_id": "x"})  # most keys missing
    with pytest.raises(AssertionError):
        valid({"name": "p", "version": "1", "digest": "0" * 64, "model": "m", "x": 1}, "policy")


@pytest.fixture(scope="module", params=BACKENDS)
def logged(request, tmp_path_factory) -> Logged:
    folder = tmp_path_factory.mktemp("documents")
    with scratch_url(request.param, folder, "documents", migrate=True) as url:
        yield seed(url)


def test_decisions_show_and_list_validate(logged):
    shown = 0
    for decision_id in [*logged.ids.values(), *logged.shadows.values()]:
        valid(run_json("decisions", "show", decision_id, "--db", logged.url))
        shown += 1
    assert shown == len(logged.ids) + len(logged.shadows)
    for extra in ((), ("--shadow",)):
        rows = run_json("decisions", "list", "--db", logged.url, *extra)
        assert rows
        for row in rows:
            valid(row, "summary")


def test_review_show_and_export_validate(logged):
    for item_id in logged.item_of.values():
        shown = run_json("review", "show", item_id, "--db", logged.url)
        valid(shown)
        assert shown["item"]["id"] == item_id
    lines = run("review", "export", "--format", "jsonl", "--db", logged.url).stdout.splitlines()
    assert len(lines) == len(logged.ids)
    for line in lines:
        valid(json.loads(line))


def test_backtest_and_shadow_report_speak_the_same_vocabulary(logged):
    from moderation.lifecycle.backtest import backtest
    from moderation.lifecycle.shadow_report import shadow_report

    candidate = candidate_policy()
    for report in (
        backtest(candidate, db=logged.url),
        shadow_report(candidate.digest, db=logged.url),
    ):
        valid(report["candidate"], "policy")
        ids = [i for taken in report["examples"].values() for i in taken]
        assert ids, report["examples"]
        for decision_id in ids:  # every example opens as a decision document
            valid(run_json("decisions", "show", decision_id, "--db", logged.url))


def test_review_show_explains_as_much_as_decisions_show(logged):
    """Issue 19 item 9: the same explanation (reason, nearest first), plus the item."""
    for role, item_id in logged.item_of.items():
        shown = run_json("review", "show", item_id, "--db", logged.url)
        decision = run_json("decisions", "show", logged.ids[role], "--db", logged.url)
        assert {k: v for k, v in shown.items() if k not in ("item", "events")} == decision
        scores = [c["score"] for c in shown["concepts"] if c["score"] is not None]
        assert scores == sorted(scores, reverse=True), "nearest first"
    band = run("review", "show", logged.item_of["band"], "--db", logged.url).stdout
    assert "why it is in review: within the review band (nudity within 0.02)" in band
    assert "verdict review, action review: set by the review band" in band
    minor = run("review", "show", logged.item_of["minor"], "--db", logged.url).stdout
    assert "why it is in review: special care: minor (escalate review)" in minor
    assert "Concepts (nearest first):" in minor


def band_policy(path: Path, model: Path, threshold: float) -> Path:
    path.write_text(
        f"policy: band\nmodel: {model}\nreview_band: 0.1\n"
        f"concepts:\n  - name: far\n    prompts: [a photo]\n    threshold: {threshold}\n"
        "    action: blur\n"
        "  - name: farther\n    prompts: [a dog]\n    threshold: 1\n    action: blackout\n"
    )
    return path


@pytest.fixture
def review_policy_file(tmp_path, tiny_clip_dir) -> tuple[Path, Path]:
    """A policy whose review band sends the sample image to review (the concept `far` scores
    0.02 below its threshold), and a shadow candidate."""
    from moderation.demo import sample_images

    sample_images(tmp_path / "photos", n=1)
    probe = band_policy(tmp_path / "probe.yaml", tiny_clip_dir, 0)
    (row,) = run_json("check", tmp_path / "photos", "--policy", probe, "--no-log")
    (far,) = [c for c in row["concepts"] if c["name"] == "far"]
    live = band_policy(tmp_path / "live.yaml", tiny_clip_dir, round(far["cosine"] + 0.02, 4))
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(
        f"policy: cand\nmodel: {tiny_clip_dir}\n"
        "concepts:\n  - name: any\n    prompts: [a photo]\n    threshold: -1\n    action: blur\n"
    )
    return live, candidate


def test_one_decision_reads_the_same_through_check_decisions_and_review(
    tmp_path, review_policy_file
):
    live, candidate = review_policy_file
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    url = f"sqlite:///{tmp_path / 'm.db'}"
    args = ["check", tmp_path / "photos", "--policy", live, "--shadow", candidate, "--db", url]
    try:
        entries = json.loads(run(*args, "--top", "0", "--json", code=1).stdout)
        checked = [e for e in entries if e["checked"]]
        for entry in entries:
            valid(entry, "document" if entry["checked"] else "not_checked")
        (entry,) = checked
        assert entry["action_reason"]["rule"] == "review_band"
        assert entry["recorded"] is True and len(entry["shadows"]) == 1
        shown = run_json("decisions", "show", entry["decision_id"], "--db", url)
        (item,) = json.loads(run("review", "list", "--db", url, "--json").stdout)
        reviewed = run_json("review", "show", item["id"], "--db", url)
        table = run(*args, "--no-log", code=1).stdout
    finally:
        db.dispose(url)
    from_check = {k: v for k, v in entry.items() if k not in ("file", "checked", "out")}
    from_review = {k: v for k, v in reviewed.items() if k not in ("item", "events")}
    assert set(from_check) == set(shown) == set(from_review)
    for key in set(shown) - READ_SIDE_ONLY:
        assert from_check[key] == shown[key] == from_review[key], key
    assert shown["review"]["items"][0]["id"] == item["id"]
    # Issue 19 item 9: the table names the concept whose band sent the image to review.
    assert "within the review band of far" in table
