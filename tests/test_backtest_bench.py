"""Section f of `moderation bench` (policy backtest throughput), at a few hundred decisions."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from moderation.bench.backtest import bench_policies, fill
from moderation.bench.config import BenchConfig
from moderation.bench.report import format_report
from moderation.bench.run import run_bench
from moderation.cli import main
from moderation.lifecycle.backtest import backtest
from moderation.storage import db


@pytest.mark.slow  # fills two logs and times both candidates in fresh processes
def test_the_section_fills_a_log_and_times_both_candidates():
    config = BenchConfig.quick(
        size="tiny", sections=("backtest",), backtest_sizes=(150, 300), backtest_dim=64
    )
    result = run_bench(config)
    rows = result["backtest"]
    assert [(r["decisions"], r["candidate"]) for r in rows] == [
        (150, "thresholds"), (150, "new concepts"), (300, "thresholds"), (300, "new concepts"),
    ]  # fmt: skip
    for r in rows:
        assert r["read"] == r["scored"] == r["decisions"] and r["per_second"] > 0
        assert r["memory_measure"] in ("VmHWM after clear_refs", "ru_maxrss")
        assert r["peak_rss_growth_mb"] >= 0 and r["embedding_dim"] == 64
    assert [r["rescored_concepts"] for r in rows[:2]] == [0, 22]  # every cosine new: 20 + 2
    assert rows[0]["changed"] > 0  # moved thresholds move some decisions
    text = format_report(result)
    assert "g. policy backtest" in text and "decisions/s" in text
    assert sum("backtest (" in t["target"] for t in result["targets"]) == 4


def test_filled_rows_are_the_engines_decisions(tmp_path):
    """The bench's bulk rows decide as logged: the logged policy backtested changes nothing."""
    logged, _ = bench_policies(64, 0)
    url = f"sqlite:///{tmp_path / 'fill.db'}"
    fill(url, logged, 0, 200)
    fill(url, logged, 200, 260)
    data = backtest(logged, db=url)
    db.dispose(url)
    assert (data["decisions"], data["scored"], data["changed"]) == (260, 260, 0)
    assert sum(data["reviewed"]["approved"].values()) > 0


def test_the_option_reaches_the_section():
    result = CliRunner().invoke(
        main,
        ["bench", "--size", "tiny", "--sections", "backtest", "--backtest-sizes", "0"],
    )
    assert result.exit_code == 2 and "expected positive integers" in result.output
    result = CliRunner().invoke(
        main, ["bench", "--quick", "--size", "tiny", "--sections", "backtest",
               "--backtest-sizes", "120", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {r["decisions"] for r in data["backtest"]} == {120}
