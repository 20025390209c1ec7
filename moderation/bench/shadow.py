"""Section f of `moderation bench` (`--sections shadow`): what shadow candidates add to a batch.

The post-encoder work is `Moderator.after_encoder`, everything `moderate()` does once the
vision tower has returned a batch's embeddings: score and decide the live policy (and, in the
shadowed run, its candidates), hash the judged images (`image_sha256`, which a logging
Moderator always does), apply the actions, build every decision's log record (the held PNG of
a review item, the shadow decisions after their live ones) and hand them to the log's
`write()`, and return the images as the caller gets them. The log is an in-memory sink: what a
database write costs is section d's, and it runs off the caller's thread in production
(`BackgroundDecisionLog`). Not timed: decoding, views and the encoder (the same with or without
candidates).

The live policy has the shipped default policy's shape (policies/default.yaml: its concepts,
special care, review band, actions and views; random unit vectors instead of prompt
embeddings, since the bench downloads no model); each candidate is that policy changed as an
author would: thresholds moved, concepts added, actions and review band changed. Images are
Stable Diffusion's 512 x 512 in [-1, 1]; with random embeddings every image is allowed, the
live policy's cheapest path, so the overhead is not hidden behind actions. The same rows also
time the decisions alone (`moderate_embeddings` without a log: score + decide), the hardest
ratio, reported without a target. Every timed call starts after an untimed 64 MB memory sweep:
in production the post-encoder work runs right after the vision tower has evicted the caches,
and without the sweep whichever call follows another's image hashing runs colder than the rest.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from moderation.bench.config import measure_interleaved
from moderation.bench.models import BenchError

if TYPE_CHECKING:
    from moderation.bench.config import BenchConfig
    from policy import CompiledPolicy

DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"
# Untimed before every timed call: a memory sweep of this size evicts the CPU caches, as the
# vision tower's forward does right before the post-encoder work in production.
SWEEP_BYTES = 64 * 2**20


class MemorySink:
    """A decision log that keeps nothing: `write()` takes the records, as DecisionLog's does."""

    def __init__(self) -> None:
        self.records = 0

    def register_policy(self, record: Any) -> None:
        pass

    def write(self, records: list[Any]) -> None:
        self.records += len(records)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def default_shaped_policy(dim: int, generator: torch.Generator) -> CompiledPolicy:
    """policies/default.yaml's concepts and rules, with random unit vectors of width `dim`."""
    from policy import CompiledPolicy, load_policy

    source = load_policy(DEFAULT_POLICY)
    concepts, special = source.concepts, source.special_concepts
    care = source.special_care
    return CompiledPolicy(
        name=source.policy,
        version=str(source.version),
        model="bench",
        concept_names=tuple(c.name for c in concepts),
        categories=tuple(c.category for c in concepts),
        severities=tuple(source.effective_severity(c) for c in concepts),
        actions=tuple(source.effective_action(c) for c in concepts),
        concept_matrix=F.normalize(torch.randn(len(concepts), dim, generator=generator)),
        thresholds=torch.tensor([float(source.effective_threshold(c)) for c in concepts]),
        special_names=tuple(c.name for c in special),
        special_matrix=F.normalize(torch.randn(len(special), dim, generator=generator)),
        special_thresholds=torch.tensor([float(source.effective_threshold(c)) for c in special]),
        adjustment=float(care.adjustment) if care else 0.0,
        escalate=care.escalate if care else None,
        review_band=float(source.review_band),
        on_error=source.on_error,
        views=source.effective_views,
    )


def candidates_of(live: CompiledPolicy, generator: torch.Generator) -> list[CompiledPolicy]:
    """Three edits of the live policy: thresholds moved, two concepts added, actions changed."""
    lowered = dataclasses.replace(live, thresholds=live.thresholds - 0.02, version="2", digest="")
    extra = F.normalize(torch.randn(2, live.embed_dim, generator=generator))
    added = dataclasses.replace(
        live,
        version="3",
        concept_names=(*live.concept_names, "weapons", "drugs"),
        categories=(*live.categories, "violence", None),
        severities=(*live.severities, "high", "medium"),
        actions=(*live.actions, "blur", "review"),
        concept_matrix=torch.cat([live.concept_matrix, extra]),
        thresholds=torch.cat([live.thresholds, torch.tensor([0.24, 0.25])]),
        digest="",
    )
    softer = dataclasses.replace(
        live,
        version="4",
        actions=tuple("blur" if a == "blackout" else a for a in live.actions),
        review_band=0.03,
        digest="",
    )
    return [lowered, added, softer]


def run_shadow(
    config: BenchConfig,
    device: torch.device,
    dtype: torch.dtype,
    dim: int,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """One row per candidate count: post-encoder ms without and with the candidates."""
    from moderation.engine import Moderator
    from moderation.images import to_image_batch
    from moderation.preprocess import judged_views

    generator = torch.Generator().manual_seed(config.seed + 3)
    live = default_shaped_policy(dim, generator).to(device)
    pool = candidates_of(live.to("cpu"), generator)
    batch_size = config.shadow_batch
    side = config.shadow_image_side
    images = (torch.rand(batch_size, 3, side, side, generator=generator) * 2 - 1).to(device)
    batch = to_image_batch(images.to(dtype), device=device, value_range="-1,1")
    frames = [batch.frames_of(i) for i in range(len(batch))]
    _, owners, views, view_errors = judged_views(frames, batch.invalid, live.views)
    errors = [e or v for e, v in zip(batch.input_errors(), view_errors, strict=True)]
    n_views = batch_size if owners is None else int(owners.numel())
    embeddings = torch.randn(n_views, dim, generator=generator).to(device, dtype)  # the tower's
    metas = [{"prompt": "a photo", "seed": i} for i in range(batch_size)]
    timed = {
        "repeats": config.repeats,
        "warmup": max(config.warmup, 1),
        "device": device,
        "min_seconds": config.shadow_seconds,
    }
    scratch = torch.empty(SWEEP_BYTES // 4, dtype=torch.float32)

    def sweep() -> None:
        scratch.fill_(1.0)  # writes more than any last-level cache holds

    rows = []
    for count in config.shadow_candidates:
        candidates = [pool[i % len(pool)] for i in range(count)]
        candidates = [
            dataclasses.replace(c, name=f"{c.name}-{i}", digest="")
            for i, c in enumerate(candidates)
        ]
        say(f"shadow: {count} candidates, batch {batch_size} ({side}x{side}, {n_views} views)")
        plain = Moderator(live, log=MemorySink())
        shadowed = Moderator(live, log=MemorySink(), shadow=candidates)
        bare, bare_shadowed = Moderator(live), Moderator(live, shadow=candidates)

        def after(moderator: Any, _: Any) -> Any:
            return moderator.after_encoder(batch, embeddings, metas, True, errors, owners, views)

        def decide(moderator: Any, _: Any) -> Any:
            return moderator.moderate_embeddings(embeddings, owners=owners, views=views)

        # Every timed call starts from caches as the encoder leaves them (untimed sweep), so
        # that no call runs warm on what the previous one left behind.
        calls = {
            "plain": (lambda x, m=plain: after(m, x), sweep),
            "shadow": (lambda x, m=shadowed: after(m, x), sweep),
            "decide_plain": (lambda x, m=bare: decide(m, x), sweep),
            "decide_shadow": (lambda x, m=bare_shadowed: decide(m, x), sweep),
        }
        # This thread's CPU time of each timed call too: the work itself, not the time the
        # thread waited for a core on a shared machine (meaningful on the CPU with one torch
        # thread, where all the work is on this thread).
        cpu: dict[str, list[float]] = {name: [] for name in calls}
        calls = {name: (_on_cpu_clock(fn, cpu[name]), setup) for name, (fn, setup) in calls.items()}
        timings, results = measure_interleaved(calls, **timed)
        cpu = {name: samples[-len(timings[name].samples_ms) :] for name, samples in cpu.items()}
        result = results["shadow"]
        if not all(len(d.shadows) == count for d in result.decisions) or not torch.equal(
            result.images, results["plain"].images
        ):  # every image shadowed by every candidate, and never acted on
            raise BenchError("shadow: the shadowed run did not decide or return what it should")
        ms = {name: t.median_ms for name, t in timings.items()}
        rows.append(
            {
                "batch": batch_size,
                "image_side": side,
                "views": n_views,
                "candidates": count,
                "concepts": len(live.concept_names),
                "special_concepts": len(live.special_names),
                "candidate_concepts": [len(c.concept_names) for c in candidates],
                "allowed": sum(d.action == "allow" for d in result.decisions),
                "plain_ms": ms["plain"],
                "shadow_ms": ms["shadow"],
                # The target: the median of the per-round differences (each round times both
                # back to back, so load that shifts during the run cancels), over plain's median.
                "overhead_pct": 100 * _paired(timings["shadow"], timings["plain"]) / ms["plain"],
                "overhead_pct_of_medians": 100 * (ms["shadow"] / ms["plain"] - 1),
                "decide_plain_ms": ms["decide_plain"],
                "decide_shadow_ms": ms["decide_shadow"],
                "decide_overhead_pct": 100
                * _paired(timings["decide_shadow"], timings["decide_plain"])
                / ms["decide_plain"],
                "records_per_batch": batch_size * (1 + count),
                "cpu_ms": {name: 1000 * statistics.median(s) for name, s in cpu.items()},
                "cpu_overhead_pct": 100
                * statistics.median(a - b for a, b in zip(cpu["shadow"], cpu["plain"], strict=True))
                / statistics.median(cpu["plain"]),
                "torch_threads": torch.get_num_threads(),
                "timing": {name: t.to_dict() for name, t in timings.items()},
            }
        )
    return rows


def _on_cpu_clock(fn: Callable[[Any], Any], samples: list[float]) -> Callable[[Any], Any]:
    def timed(arg: Any) -> Any:
        start = time.thread_time()
        result = fn(arg)
        samples.append(time.thread_time() - start)
        return result

    return timed


def _paired(timing: Any, base: Any) -> float:
    """Median ms of timing - base over the rounds they were timed in together."""
    pairs = zip(timing.samples_ms, base.samples_ms, strict=True)
    return statistics.median(a - b for a, b in pairs)
