"""What a `moderation bench --quick` run says under its targets: why it misses some."""

from __future__ import annotations

from typing import Any


def quick_misses(result: dict[str, Any]) -> list[str]:
    """Why a `--quick` run misses targets: what it measured, and what the full run measures."""
    config = result.get("config") or {}
    missed = [t for t in result.get("targets") or () if t["met"] is False]
    if not config.get("quick") or not missed:
        return []
    batches = ", ".join(str(b) for b in config.get("batch_sizes") or ())
    return [
        "",
        f"{len(missed)} target(s) missed by this --quick run: it measures batch {batches} only,"
        f" {config.get('repeats')} repeats without warm-up, concept rows in batches of"
        f" {config.get('concept_batch')} on {result.get('environment', {}).get('device', 'this device')}"
        " (a short, noisy sample, meant to check that the bench runs). The targets are set for"
        " the full run (`moderation bench` without --quick: batches 1, 8 and 32, five repeats"
        " after a warm-up, on a GPU); BENCHMARKS.md has its measured tables.",
    ]
