"""Section g of `moderation bench`: `policy backtest` throughput and memory over a large log.

Each database (a temporary SQLite file, a scratch PostgreSQL database) is filled with N logged
decisions of a 20-concept policy (2 special-care concepts, 768-wide float16 embeddings, 10% of
the images judged on two views, review items for the decisions sent to review, half of them
decided), written through the storage schema in bulk. The decisions are the engine's own
(`scoring.score` and `decision.action_ranks` on random unit embeddings). Two candidates are
timed at each size: "thresholds" (every threshold moved: every cosine is the logged one) and
"new concepts" (20 new vectors: every cosine is scored from the stored embeddings).

Each backtest runs in a fresh child process (spawned), so that its memory is its own: the peak
RSS growth is the child's VmHWM after the run minus its RSS just before it (the kernel's peak is
reset first through /proc/self/clear_refs; without that, ru_maxrss, which can only overstate it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from moderation.bench.config import BenchConfig
    from policy.compiled import CompiledPolicy

FILL_CHUNK = 5_000  # knob: decisions generated and inserted per transaction
CONCEPTS, SPECIAL = 20, 2
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
CASES = ("thresholds", "new concepts")


def run_backtest(config: BenchConfig, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """One row per database, size and candidate: seconds, decisions/s, peak RSS growth."""
    from moderation.bench.log_throughput import scratch_database
    from moderation.storage import db

    logged, candidates = bench_policies(config.backtest_dim, config.seed)
    rows: list[dict[str, Any]] = []
    for spec in config.db_urls:
        with tempfile.TemporaryDirectory(prefix="moderation-bench-backtest-") as tmp:
            folder = Path(tmp)
            paths = {}
            for case, policy in candidates.items():
                paths[case] = folder / f"{case.replace(' ', '-')}.compiled.safetensors"
                policy.save(paths[case])
            with scratch_database(spec, folder) as (url, label):
                filled = 0
                for size in sorted(config.backtest_sizes):
                    say(f"backtest: filling {label} to {size:,} decisions")
                    started = time.perf_counter()
                    fill(url, logged, filled, size, seed=config.seed)
                    fill_s = time.perf_counter() - started
                    filled = size
                    db.dispose(url)
                    for case in CASES:
                        say(f"backtest: {case}, {size:,} decisions, {label}")
                        measured = measure_in_child(url, paths[case], config.backtest_chunk)
                        rows.append(
                            {
                                "database": label,
                                "decisions": size,
                                "candidate": case,
                                "fill_seconds": fill_s,
                                "embedding_dim": logged.embed_dim,
                                "concepts": CONCEPTS,
                                **measured,
                            }
                        )
    return rows


def bench_policies(dim: int, seed: int) -> tuple[CompiledPolicy, dict[str, CompiledPolicy]]:
    """The logged policy and the two candidates (see the module's docstring)."""
    from moderation.bench.models import sparse_thresholds
    from policy.compiled import CompiledPolicy

    g = torch.Generator().manual_seed(seed + 11)

    def unit(n: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)

    actions = tuple(("blur", "blackout", "review", "pixelate")[i % 4] for i in range(CONCEPTS))
    logged = CompiledPolicy(
        name="bench-backtest",
        version="1",
        model="bench/random-vit-l",
        concept_names=tuple(f"concept-{i:02d}" for i in range(CONCEPTS)),
        categories=(None,) * CONCEPTS,
        severities=("high",) * CONCEPTS,
        actions=actions,
        concept_matrix=unit(CONCEPTS),
        thresholds=sparse_thresholds(CONCEPTS, dim, g),
        special_names=("special-0", "special-1"),
        special_matrix=unit(SPECIAL),
        special_thresholds=sparse_thresholds(SPECIAL, dim, g),
        adjustment=0.01,
        escalate="review",
        review_band=0.005,
    )
    moved = dataclasses.replace(
        logged,
        version="2",
        thresholds=logged.thresholds + 0.01 * torch.randn(CONCEPTS, generator=g),
        digest="",
    )
    new = dataclasses.replace(
        logged,
        version="3",
        concept_names=tuple(f"new-{i:02d}" for i in range(CONCEPTS)),
        concept_matrix=unit(CONCEPTS),
        special_matrix=unit(SPECIAL),
        digest="",
    )
    return logged, {"thresholds": moved, "new concepts": new}


def fill(url: str, policy: CompiledPolicy, start: int, stop: int, *, seed: int = 0) -> None:
    """Log decisions start..stop-1 of `policy` into `url` (deterministic per decision index)."""
    from sqlalchemy import insert

    from moderation.storage.log import DecisionLog
    from moderation.storage.models import DecisionRow, ReviewItem
    from moderation.storage.records import policy_record
    from moderation.storage.schema import get_engine

    if start == 0:
        with (
            tempfile.TemporaryDirectory() as scratch,
            DecisionLog(
                url, spool_dir=Path(scratch) / "spool", held_dir=Path(scratch) / "held"
            ) as log,
        ):
            log.register_policy(policy_record(policy))
            log.flush()
    engine = get_engine(url)
    for begin in range(start, stop, FILL_CHUNK):
        decisions, items = _rows(policy, begin, min(begin + FILL_CHUNK, stop), seed)
        with engine.begin() as conn:
            conn.execute(insert(DecisionRow.__table__), decisions)
            if items:
                conn.execute(insert(ReviewItem.__table__), items)
    with engine.begin() as conn:  # statistics, as a database in service has them
        conn.exec_driver_sql("ANALYZE")


def _rows(policy: CompiledPolicy, begin: int, end: int, seed: int) -> tuple[list, list]:
    """The decisions rows (and review items) of decisions begin..end-1, as the engine logs them."""
    from moderation.decision import action_ranks
    from moderation.scoring import score
    from policy.vocabulary import ACTIONS, verdict_of

    n = end - begin
    g = torch.Generator().manual_seed(seed * 1_000_003 + begin)
    views = (torch.rand(n, generator=g) < 0.1).long() + 1  # [n] 1 or 2 views
    owners = torch.repeat_interleave(torch.arange(n), views)
    embeddings = torch.nn.functional.normalize(
        torch.randn(len(owners), policy.embed_dim, generator=g), dim=1
    )
    half = embeddings.to(torch.float16)
    s = score(policy, half.float(), owners, n)
    rank, margin, top = action_ranks(policy, s)
    cos, sc = s.cosines.numpy(), s.scores.numpy()
    scos, ssc = s.special_cosines.numpy(), s.special_scores.numpy()
    cviews = s.concept_views.to(torch.int16).numpy()
    sviews = s.special_views.to(torch.int16).numpy()
    flat = half.numpy()
    bounds = np.concatenate([[0], np.cumsum(views.numpy())])
    names, special_names = policy.concept_names, policy.special_names
    now = datetime.now(timezone.utc)
    decisions, items = [], []
    for i in range(n):
        k = begin + i
        action = ACTIONS[int(rank[i])]
        two = views[i] == 2
        box = [{"frame": 0, "box": [0, 0, 512, 512]}, {"frame": 0, "box": [0, 256, 512, 768]}]
        did = str(uuid.UUID(int=(seed << 64) + k + 1, version=4))
        decisions.append(
            {
                "id": did,
                "created_at": T0 + timedelta(milliseconds=k),
                "policy_digest": policy.digest,
                "model_id": policy.model,
                "image_sha256": hashlib.sha256(f"{seed}:{k}".encode()).hexdigest(),
                "verdict": verdict_of(action),
                "action": action,
                "top_concept": names[int(top[i])],
                "margin": float(margin[i]),
                "fired": [names[j] for j in np.flatnonzero(sc[i] > 0)],
                "special_hits": [special_names[j] for j in np.flatnonzero(ssc[i] > 0)],
                "adjustment": float(s.adjustment[i]),
                "cosines": cos[i].tobytes(),
                "scores": sc[i].tobytes(),
                "special_cosines": scos[i].tobytes(),
                "special_scores": ssc[i].tobytes(),
                "embedding": flat[bounds[i] : bounds[i + 1]].tobytes(),
                "meta": {"prompt": f"benchmark image {k}", "seed": k, "user": "bench"},
                "error": None,
                "held_path": None,
                "views": box if two else None,
                "concept_views": cviews[i].tobytes() if two else None,
                "special_views": sviews[i].tobytes() if two else None,
                "shadow_of": None,
            }
        )
        if action == "review":
            status = ("approved", "rejected", "pending")[k % 3]
            items.append(
                {
                    "decision_id": did,
                    "status": status,
                    "priority": int(bool(ssc[i].max(initial=-1) > 0)),
                    "margin": float(margin[i]),
                    "created_at": now,
                    "updated_at": now,
                    "reviewer": None if status == "pending" else "bench",
                }
            )
    return decisions, items


def measure_in_child(url: str, candidate: Path, chunk: int | None) -> dict[str, Any]:
    """Backtest `candidate` over `url` in a fresh Python process: seconds, decisions/s, memory.

    The URL goes through stdin (not argv: `ps` would show a password); the result comes back as
    JSON on stdout."""
    import json
    import subprocess
    import sys

    from moderation.bench.models import BenchError

    job = json.dumps({"url": url, "candidate": str(candidate), "chunk": chunk})
    done = subprocess.run(
        [sys.executable, "-m", "moderation.bench.backtest"],
        input=job,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise BenchError(f"backtest bench: the measuring process failed: {why}")
    return json.loads(lines[-1])


def _rss_kib(field: str) -> int | None:
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _measure(url: str, candidate: str, chunk: int | None) -> dict[str, Any]:
    import resource

    from moderation.lifecycle import history
    from moderation.lifecycle.backtest import backtest, load_candidate
    from moderation.storage.schema import get_engine

    policy = load_candidate(candidate)
    get_engine(url)  # connect and check the schema before the clock starts
    reset = False
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
        reset = True
    before = _rss_kib("VmRSS")
    started = time.perf_counter()
    data = backtest(policy, db=url, chunk=chunk or history.READ_CHUNK)
    seconds = time.perf_counter() - started
    if reset and before is not None:
        peak, how = _rss_kib("VmHWM"), "VmHWM after clear_refs"
    else:
        peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    return {
        "seconds": seconds,
        "read": data["decisions"],
        "scored": data["scored"],
        "changed": data["changed"],
        "per_second": data["decisions"] / seconds,
        "rss_before_mb": (before or 0) / 1024,
        "peak_rss_growth_mb": ((peak or 0) - (before or 0)) / 1024,
        "memory_measure": how,
        "chunk": chunk or history.READ_CHUNK,
        "rescored_concepts": len(data["rescored_concepts"]),
    }


if __name__ == "__main__":
    import json
    import sys

    job = json.loads(sys.stdin.read())
    print(json.dumps(_measure(job["url"], job["candidate"], job["chunk"])))
