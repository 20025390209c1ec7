"""Live readers leave shadow decisions out: `review stats`, `review export` (which also carries
each decision's verdict labels), on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from moderation.cli import main
from moderation.review.queue import ReviewQueue
from moderation.review.report import EXPORT_FIELDS
from moderation.storage import db
from moderation.storage.models import DecisionRow
from tests.decisions_factory import HOSTILE_USER, Logged, seed

BAND_LABELS = {"shows": ["nudity"], "missed": ["nudity"], "false_alarms": [], "explicit": True}


@pytest.fixture(scope="module")
def logged(module_db_url) -> Logged:
    return seed(module_db_url)


def test_the_log_holds_shadow_rows(logged):
    with db.engine_for(logged.url).connect() as conn:
        shadows = conn.execute(
            select(func.count()).where(DecisionRow.shadow_of.is_not(None))
        ).scalar_one()
        total = conn.execute(select(func.count()).select_from(DecisionRow)).scalar_one()
    assert (shadows, total) == (len(logged.shadows), len(logged.ids) + len(logged.shadows))


def test_stats_count_live_decisions_only(logged):
    stats = ReviewQueue(logged.url).stats()
    # Shadow rows would add 3 decisions, blackout/gore (dolphin), allow (band), blur/nudity (views).
    assert stats["decisions"] == {
        "total": 8,
        "by_action": {"allow": 2, "blackout": 2, "blur": 1, "review": 3},
        "by_verdict": {"allow": 2, "error": 1, "flag": 2, "review": 3},
        "by_concept": {"nudity": 2, "gore": 1, "weapons": 1},
    }
    assert stats["queue"] == {"pending": 2, "claimed": 0, "approved": 0, "rejected": 1}
    text = CliRunner().invoke(main, ["review", "stats", "--db", logged.url]).stdout
    assert "Decisions: 8\n" in text


def export(logged: Logged, fmt: str) -> str:
    result = CliRunner().invoke(
        main, ["review", "export", "--format", fmt, "--db", logged.url], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return result.stdout


def test_export_jsonl_is_live_decisions_with_labels(logged):
    rows = [json.loads(line) for line in export(logged, "jsonl").splitlines()]
    assert [r["decision_id"] for r in rows] == logged.order  # oldest first, no shadow row
    # JSON lines are decision documents (CHANGELOG, issue 14); CSV columns flatten them.
    assert EXPORT_FIELDS[-1] == "labels" and "review" in rows[0] and "labels" in rows[0]
    by_id = {r["decision_id"]: r for r in rows}
    band = by_id[logged.ids["band"]]
    (newest,) = band["review"]["items"]
    assert (newest["status"], newest["reviewer"], newest["labels"]) == (
        "rejected",
        "rita",
        BAND_LABELS,
    )
    # pending items and decisions never reviewed have no verdict, so no labels
    for role in ("minor", "weapons", "dolphin", "error"):
        assert by_id[logged.ids[role]]["labels"] is None, role
    assert by_id[logged.ids["minor"]]["review"]["items"][-1]["status"] == "pending"
    assert by_id[logged.ids["minor"]]["metadata"]["user"] == HOSTILE_USER  # exact in JSON


def test_export_csv_has_a_labels_column_and_stays_escaped(logged):
    text = export(logged, "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["decision_id"] for r in rows] == logged.order
    by_id = {r["decision_id"]: r for r in rows}
    assert json.loads(by_id[logged.ids["band"]]["labels"]) == BAND_LABELS
    assert by_id[logged.ids["minor"]]["labels"] == ""
    assert "\x1b" not in text and "\x07" not in text
    meta = by_id[logged.ids["minor"]]["metadata"]  # renamed from meta
    assert json.loads(meta)["user"] == HOSTILE_USER  # ensure_ascii JSON: escaped, and exact
