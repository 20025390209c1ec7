"""Migration 0005: `decisions.action_reason`, recorded at decision time, up and down on both
backends with rows; a row logged without it keeps today's derivation in its document."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from sqlalchemy import inspect, select

from moderation.decisions.document import logged_decision_document
from moderation.engine import Moderator
from moderation.storage import DecisionLog, downgrade, upgrade
from moderation.storage import db as storage_db
from moderation.storage.models import DecisionRow
from tests.kernel_factory import exact_rows, policy
from tests.pg import BACKENDS, scratch_url

ROOT = Path(__file__).resolve().parent.parent


def migration():
    path = ROOT / "migrations" / "versions" / "0005_action_reason.py"
    spec = importlib.util.spec_from_file_location("migration_0005", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path):
    with scratch_url(request.param, tmp_path, "reason", migrate=True) as url:
        yield url
        storage_db.dispose(url)


def columns(url: str) -> set[str]:
    with storage_db.engine_for(url).connect() as conn:
        return {c["name"] for c in inspect(conn).get_columns("decisions")}


def reasons(url: str) -> dict[str, object]:
    with storage_db.engine_for(url).connect() as conn:
        rows = conn.execute(select(DecisionRow.id, DecisionRow.action_reason)).all()
        return {row.id: row.action_reason for row in rows}


def test_reasons_are_recorded_and_survive_down_and_up(url, tmp_path):
    g = torch.Generator().manual_seed(5)
    live = policy(g, "live", 4, 1)
    with DecisionLog(url, spool_dir=tmp_path / "spool", held_dir=tmp_path / "held") as log:
        moderator = Moderator(live, log=log)
        decisions = moderator.moderate_embeddings(exact_rows(g, 12))
    recorded = reasons(url)
    assert recorded == {
        d.decision_id: {"rule": d.action_reason, "concept": d.reason_concept} for d in decisions
    }
    assert len({r["rule"] for r in recorded.values()}) >= 2  # the rows exercise several rules
    expected = {}
    with storage_db.engine_for(url).connect() as conn:
        for d in decisions:
            doc = logged_decision_document(conn, d.decision_id)
            expected[d.decision_id] = doc["action_reason"]
            assert (doc["action_reason"]["rule"], doc["action_reason"]["concept"]) == (
                d.action_reason,
                d.reason_concept,
            )
    storage_db.dispose(url)

    module = migration()
    assert module.revision == "0005"  # later migrations are undone and redone with it
    downgrade(url, module.down_revision)
    assert "action_reason" not in columns(url)
    with storage_db.engine_for(url).connect() as conn:
        ids = set(conn.exec_driver_sql("SELECT id FROM decisions").scalars())
    assert ids == {d.decision_id for d in decisions}  # every row kept
    storage_db.dispose(url)

    upgrade(url, "head")
    assert "action_reason" in columns(url)
    assert set(reasons(url).values()) == {None}  # rows logged before: no recorded reason
    with storage_db.engine_for(url).connect() as conn:
        for d in decisions:  # ...and their documents derive the very same reason
            assert (
                logged_decision_document(conn, d.decision_id)["action_reason"]
                == (expected[d.decision_id])
            )
