"""Section f of `moderation bench`: post-encoder work with and without shadow candidates."""

from __future__ import annotations

from moderation.bench.config import BenchConfig
from moderation.bench.report import format_report
from moderation.bench.run import run_bench
from moderation.bench.shadow import candidates_of, default_shaped_policy


def test_shadow_section_times_the_post_encoder_work_with_and_without_candidates():
    config = BenchConfig.quick(
        size="tiny",
        sections=("shadow",),
        repeats=2,
        warmup=0,
        shadow_batch=3,
        shadow_candidates=(1, 3),
        shadow_image_side=48,
        shadow_seconds=0.0,
    )
    data = run_bench(config)
    assert data["model"] is None
    one, three = data["shadow"]
    assert (one["candidates"], three["candidates"]) == (1, 3)
    for row in (one, three):
        assert (row["batch"], row["image_side"], row["views"]) == (3, 48, 3)
        assert row["plain_ms"] > 0 and row["shadow_ms"] > 0 and row["decide_plain_ms"] > 0
        assert row["overhead_pct_of_medians"] == 100 * (row["shadow_ms"] / row["plain_ms"] - 1)
        assert row["records_per_batch"] == 3 * (1 + row["candidates"])
        assert set(row["timing"]) == {"plain", "shadow", "decide_plain", "decide_shadow"}
        assert row["timing"]["plain"]["repeats"] == 2
    assert three["candidate_concepts"] == [8, 10, 8]  # the default policy's 8, and two added
    (target,) = [t for t in data["targets"] if t["target"].startswith("shadowing 3")]
    assert target["measured"] == f"{three['overhead_pct']:+.1f}%"
    assert target["met"] is (three["overhead_pct"] <= 5.0)
    report = format_report(data)
    assert "f. Shadow candidates: post-encoder work of a batch of 3" in report


def test_bench_policies_have_the_shipped_default_policy_shape():
    import torch

    live = default_shaped_policy(768, torch.Generator().manual_seed(0))
    assert live.concept_names[:2] == ("nudity", "sexual-activity")
    assert (len(live.concept_names), len(live.special_names)) == (8, 1)
    assert (live.review_band, live.escalate, live.views) == (0.015, "review", "cover")
    lowered, added, softer = candidates_of(live, torch.Generator().manual_seed(1))
    assert torch.allclose(lowered.thresholds, live.thresholds - 0.02)
    assert added.concept_names[-2:] == ("weapons", "drugs")
    assert "blackout" not in softer.actions and softer.review_band == 0.03
    assert len({live.digest, lowered.digest, added.digest, softer.digest}) == 4
