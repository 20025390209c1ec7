"""`moderation bench` section e: the cost of full coverage against the centre crop (no timing
is asserted: the numbers live in BENCHMARKS.md)."""

from __future__ import annotations

from moderation.bench.config import BenchConfig
from moderation.bench.report import format_report
from moderation.bench.run import run_bench


def test_views_section_reports_views_and_ms_per_image_for_each_aspect():
    config = BenchConfig.quick(size="tiny", sections=("views",), repeats=1, warmup=0)
    data = run_bench(config)
    rows = data["views"]
    assert [(r["aspect"], r["height"], r["width"]) for r in rows] == [
        ("1:1", 512, 512),
        ("2:3", 768, 512),
        ("9:16", 1024, 576),
    ]
    assert [r["views_per_image"] for r in rows] == [
        {"center": 1, "cover": 1, "tiles": 10},
        {"center": 1, "cover": 2, "tiles": 17},
        {"center": 1, "cover": 2, "tiles": 23},
    ]
    for row in rows:
        assert set(row["ms_per_image"]) == {"center", "cover"}  # --quick does not time tiles
        assert all(ms > 0 for ms in row["ms_per_image"].values())
        assert (
            row["x_center"]["cover"] == row["ms_per_image"]["cover"] / row["ms_per_image"]["center"]
        )
        assert row["timing"]["cover"]["repeats"] == 1
    report = format_report(data)
    assert "e. Coverage: views per image and ms per image" in report
    assert "9:16    576x1024" in report


def test_views_section_times_tiles_when_asked():
    config = BenchConfig.quick(
        size="tiny", sections=("views",), repeats=1, warmup=0, view_modes=("cover", "tiles")
    )
    (square, *_) = run_bench(config)["views"]
    assert set(square["ms_per_image"]) == {"cover", "tiles"}
    assert square["x_center"] == {"cover": None, "tiles": None}  # no centre crop timed
