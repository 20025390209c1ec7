"""`moderation review ...` through click: exit codes, tables, messages and `--json` shapes."""

from __future__ import annotations

import csv
import io
import json

import click
import pytest
from click.testing import CliRunner

import moderation.cli.review_cmds  # noqa: F401  (registers the review commands)
from moderation.cli import main
from moderation.cli.app import review
from moderation.review.queue import ReviewQueue
from tests.review_factory import PG_URL, pg_database, seed, sqlite_url

ITEM_KEYS = {
    "id",
    "decision_id",
    "status",
    "priority",
    "margin",
    "created_at",
    "updated_at",
    "claim_owner",
    "claim_expires_at",
    "reviewer",
    "reason",
    "reopened_from",
    "policy_name",
    "policy_version",
    "policy_digest",
    "verdict",
    "action",
    "top_concept",
    "fired",
    "image_sha256",
}


@pytest.fixture
def db_url(tmp_path):
    return sqlite_url(tmp_path)


@pytest.fixture
def seeded(db_url):
    ReviewQueue(db_url)  # migrates the fresh file
    return seed(db_url, 4, rng_seed=3, allowed=2)


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(main, ["review", *args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def run_json(*args: str):
    return json.loads(run(*args, "--json").stdout)


def _leaf_commands() -> list[tuple[str, ...]]:
    """Every review command, and each subcommand of a group (`user add`, `webhook list`...)."""
    found = []
    for name, command in sorted(review.commands.items()):
        if isinstance(command, click.Group):
            found += [(name, sub) for sub in sorted(command.commands)]
        else:
            found.append((name,))
    return found


@pytest.mark.parametrize("command", _leaf_commands(), ids=" ".join)
def test_every_review_command_has_help(command):
    result = run(*command, "--help")
    assert result.output.startswith(f"Usage: main review {' '.join(command)}")
    leaf = review
    for name in command:
        leaf = leaf.commands[name]
    assert leaf.help.splitlines()[0] in result.output
    assert "--db URL" in result.output


def test_all_commands_are_there():
    assert set(review.commands) == {
        "list",
        "show",
        "claim",
        "approve",
        "reject",
        "reopen",
        "stats",
        "export",
        "serve",
        "user",
        "webhook",
    }


def test_list_table_and_json(db_url, seeded):
    lines = run("list", "--db", db_url).output.splitlines()
    assert lines[0].split() == [
        "ID",
        "STATUS",
        "PRI",
        "MARGIN",
        "ACTION",
        "FIRED",
        "POLICY",
        "CREATED",
        "(UTC)",
        "WHO",
    ]
    assert len(lines) == 5
    assert all("nsfw-basic@1" in line and "2024-05-01 12:00:0" in line for line in lines[1:])
    # Aligned: the POLICY column starts at the same offset on every row.
    assert len({line.index("nsfw-basic@1") for line in lines[1:]}) == 1
    items = run_json("list", "--db", db_url)
    assert [set(i) for i in items] == [ITEM_KEYS] * 4
    assert {i["id"] for i in items} == set(seeded.item_ids)
    assert run_json("list", "--status", "approved", "--db", db_url) == []
    assert len(run_json("list", "--limit", "2", "--db", db_url)) == 2
    assert run("list", "--status", "approved", "--db", db_url).output == "No review items match.\n"


def test_db_url_from_environment(db_url, seeded, monkeypatch):
    monkeypatch.setenv("MODERATION_DB_URL", db_url)
    assert len(run_json("list")) == 4


def test_claim_approve_reject_flow(db_url, seeded):
    claims = run_json("claim", "--reviewer", "alice", "-n", "2", "--lease", "120", "--db", db_url)
    assert [set(c) for c in claims] == [{"item_id", "decision_id", "token", "expires_at"}] * 2
    first, second = claims
    result = run("claim", "--reviewer", "bob", "--db", db_url)
    assert result.output.startswith("Claimed 1 item(s) for bob until ")
    assert "TOKEN" in result.output.splitlines()[1]
    bobs = run_json("list", "--status", "claimed", "--db", db_url)
    assert {i["claim_owner"] for i in bobs} == {"alice", "bob"}
    (bob_item,) = [i["id"] for i in bobs if i["claim_owner"] == "bob"]

    approve = ["approve", str(first["item_id"]), "--reviewer", "alice"]
    result = run(*approve, "--token", "wrong", "--db", db_url, code=1)
    assert result.output == (
        f"Error: item {first['item_id']}: token does not match the current claim; "
        "use the token of your latest claim\n"
    )
    result = run(*approve, "--token", first["token"], "--reason", "fine", "--db", db_url)
    assert result.output == f"Approved item {first['item_id']}.\n"
    result = run(
        "reject", str(second["item_id"]), "--reviewer", "alice", "--reason", "gore", "--db", db_url
    )
    assert result.output == f"Rejected item {second['item_id']}.\n"
    result = run("approve", str(bob_item), "--reviewer", "alice", "--db", db_url, code=1)
    assert result.output == f"Error: item {bob_item}: claimed by bob, not alice\n"
    result = run("approve", str(first["item_id"]), "--reviewer", "alice", "--db", db_url, code=1)
    assert "already approved by alice; reopen it to review it again" in result.output


def test_usage_and_input_errors(db_url, seeded):
    item = str(seeded.item_ids[0])
    result = run("reject", item, "--reviewer", "alice", "--db", db_url, code=2)
    assert "Missing option '--reason'" in result.output
    result = run("approve", item, "--db", db_url, code=2)
    assert "Missing option '--reviewer'" in result.output
    result = run("approve", "twelve", "--reviewer", "a", "--db", db_url, code=2)
    assert "'twelve' is not a valid integer" in result.output
    result = run("claim", "--reviewer", "a", "-n", "0", "--db", db_url, code=2)
    assert "Invalid value for '-n'" in result.output
    result = run("approve", item, "--reviewer", " ", "--db", db_url, code=1)
    assert result.output == "Error: a reviewer name is required\n"
    result = run("reopen", item, "--reviewer", "a", "--reason", "", "--db", db_url, code=1)
    assert result.output == "Error: a reason is required to reopen an item\n"
    result = run("show", "999", "--db", db_url, code=1)
    assert result.output == "Error: item 999: no such review item\n"
    result = run("list", "--since", "last week", "--db", db_url, code=1)
    assert result.output.startswith('Error: invalid since "last week"')
    result = run("export", "--format", "xml", "--db", db_url, code=2)
    assert "Invalid value for '--format'" in result.output
    result = run("list", "--db", "nosuchdriver://x", code=1)
    assert result.output.startswith("Error: invalid database URL")


def test_reopen(db_url, seeded):
    item = seeded.item_ids[0]
    run("reject", str(item), "--reviewer", "alice", "--reason", "gore", "--db", db_url)
    result = run("reopen", str(item), "--reviewer", "carol", "--reason", "appeal", "--db", db_url)
    new = max(seeded.item_ids) + 1
    assert result.output == f"Reopened item {item} as item {new} (pending).\n"
    shown = run_json("show", str(new), "--db", db_url)
    assert shown["item"]["reopened_from"] == item and shown["item"]["status"] == "pending"
    assert run_json("show", str(item), "--db", db_url)["item"]["status"] == "rejected"
    result = run(
        "reopen", str(item), "--reviewer", "carol", "--reason", "again", "--db", db_url, code=1
    )
    assert result.output == (
        f"Error: item {item}: already reopened as item {new} (pending); reopen item {new} instead\n"
    )


def test_show_text_and_json(db_url, seeded):
    item = seeded.item_ids[1]
    run("claim", "--reviewer", "alice", "-n", "4", "--db", db_url)
    run("approve", str(item), "--reviewer", "alice", "--reason", "harmless", "--db", db_url)
    text = run("show", str(item), "--db", db_url).output
    assert text.startswith(f"Item {item}: approved by alice: harmless\n")
    for expected in (
        "Decision " + seeded.decisions[1].decision_id,
        "Policy nsfw-basic version 1",
        "CONCEPT  SEVERITY  ACTION",
        "Special care: adjustment applied",
        'meta prompt="a test image" seed=7 user="u1"',
        "History (UTC):",
        "system  created",
        "alice   claimed",
        "alice   approved  harmless",
    ):
        assert expected in text
    shown = run_json("show", str(item), "--db", db_url)
    assert set(shown) == {"item", "decision", "policy", "concepts", "special_care", "events"}
    assert [c["name"] for c in shown["concepts"]] == ["nudity", "gore", "weapons"]
    assert set(shown["concepts"][0]) == {
        "name",
        "category",
        "severity",
        "action",
        "threshold",
        "cosine",
        "score",
        "margin_to_threshold",
        "fired",
    }
    assert [e["event"] for e in shown["events"]] == ["created", "claimed", "approved"]


def test_stats_text_and_json(db_url, seeded):
    run("claim", "--reviewer", "alice", "--db", db_url)
    text = run("stats", "--db", db_url).output
    assert text.startswith("Queue: pending 3, claimed 1, approved 0, rejected 0\n")
    assert "Oldest pending: item" in text and "Decisions: 6" in text
    assert "by action: allow 2" in text
    stats = run_json("stats", "--db", db_url)
    assert set(stats) == {"queue", "expired_leases", "oldest_pending", "decisions"}
    assert set(stats["decisions"]) == {"total", "by_action", "by_verdict", "by_concept"}
    assert stats["decisions"]["total"] == 6


def test_export_jsonl_and_csv(db_url, seeded, tmp_path):
    item = seeded.item_ids[0]
    run("reject", str(item), "--reviewer", "alice", "--reason", "gore", "--db", db_url)
    rows = [
        json.loads(line)
        for line in run("export", "--format", "jsonl", "--db", db_url).stdout.splitlines()
    ]
    assert len(rows) == 6
    assert {r["decision_id"] for r in rows} == {d.decision_id for d in seeded.decisions}
    (rejected,) = [r for r in rows if r["review_item_id"] == item]
    assert (rejected["review_status"], rejected["reviewer"], rejected["review_reason"]) == (
        "rejected",
        "alice",
        "gore",
    )
    assert set(rejected["scores"]) == {"nudity", "gore", "weapons"}
    assert sum(r["review_status"] is None for r in rows) == 2, "allowed decisions have no item"

    out = tmp_path / "export.csv"
    result = run("export", "--format", "csv", "-o", str(out), "--db", db_url)
    assert result.stderr == f"Exported 6 decisions to {out}.\n" and result.stdout == ""
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(table) == 6
    (row,) = [r for r in table if r["review_item_id"] == str(item)]
    assert row["review_status"] == "rejected" and json.loads(row["fired"]) == rejected["fired"]


@pytest.mark.postgres
@pytest.mark.skipif(not PG_URL, reason="MODERATION_TEST_PG_URL is not set")
def test_cli_on_postgres():
    with pg_database("review_cli") as url:
        seeded = seed(url, 2)
        (claim,) = run_json("claim", "--reviewer", "alice", "--db", url)
        run("approve", str(claim["item_id"]), "--reviewer", "alice", "--db", url)
        assert run_json("stats", "--db", url)["queue"]["approved"] == 1
        assert {i["id"] for i in run_json("list", "--db", url)} == set(seeded.item_ids)


def test_database_failure_is_one_line(db_url, seeded):
    with ReviewQueue(db_url).engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE review_events")
    result = run("show", str(seeded.item_ids[0]), "--db", db_url, code=1)
    assert result.output == f"Error: cannot reach database {db_url}: no such table: review_events\n"
