"""`moderation bench --sections pipelines`: moderate_pipeline's extra time, split and judged."""

from __future__ import annotations

import pytest

from moderation.bench.config import BenchConfig
from moderation.bench.pipelines import pipelines_targets
from moderation.bench.report import format_report
from moderation.bench.run import run_bench


@pytest.mark.slow  # two tiny pipelines, bare and wrapped, a warm-up and a timed round each
def test_the_pipelines_section_splits_the_extra_time():
    config = BenchConfig.quick(size="tiny", sections=("pipelines",), repeats=1, fast_seconds=0)
    data = run_bench(config)
    rows = data["pipelines"]
    assert [r["pipeline"] for r in rows] == ["tiny SDXL-shaped", "tiny text-to-video"]
    for row in rows:
        assert row["device"] == "cpu"
        assert row["bare_ms"] > 0 and row["wrapped_ms"] > 0 and row["encoder_ms"] > 0
        assert row["extra_ms"] == pytest.approx(row["wrapped_ms"] - row["bare_ms"])
        assert row["rest_ms"] == pytest.approx(row["extra_ms"] - row["encoder_ms"])
        assert row["rest_pct"] == pytest.approx(100 * row["rest_ms"] / row["bare_ms"])
        assert 0 < row["own_ms"] < row["moderation_ms"]
        assert row["overhead_pct"] == pytest.approx(100 * row["own_ms"] / row["bare_ms"])
        assert row["own_ms"] > 0
        assert 0 < row["conversion_ms"] < row["wrapped_ms"]
        assert row["encoder_ms"] <= row["moderation_ms"]  # the encoder runs inside moderation
    report = format_report(data)
    assert "h. moderate_pipeline: extra wall time over the bare pipeline" in report
    assert "on cpu" in report
    judged = [t for t in data["targets"] if t["target"].startswith("moderate_pipeline")]
    assert judged == pipelines_targets(rows) and len(judged) == 2


def test_the_target_is_judged_from_the_numbers():
    rows = [{"pipeline": "p", "overhead_pct": 4.9}, {"pipeline": "q", "overhead_pct": 5.1}]
    assert [t["met"] for t in pipelines_targets(rows)] == [True, False]
