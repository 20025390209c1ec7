"""Section d of `moderation bench`: decisions logged per second through BackgroundDecisionLog.

Each database gets a throwaway home: SQLite a temporary file, PostgreSQL a scratch database
created on the given server and dropped afterwards, so a bench never writes into real data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moderation.bench.models import BenchError

if TYPE_CHECKING:
    from moderation.bench.config import BenchConfig
    from moderation.storage import DecisionRecord

# Decisions are made in chunks of this many embeddings while building the records (not timed).
BUILD_CHUNK = 512


def run_logging(
    policy: Any, config: BenchConfig, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """One row per database: seconds, decisions/s, rows found afterwards, spooled and lost."""
    from moderation.bench.models import sparse_thresholds

    # The model's concepts with thresholds that a few images cross, as in real traffic, special
    # care escalated to review (review items and their events are part of the load), and a
    # fresh digest per run: rows are counted by it, never mixed with an earlier run's.
    generator = torch.Generator().manual_seed(config.seed + 3)
    dim = policy.embed_dim
    policy = dataclasses.replace(
        policy,
        name=f"bench-{secrets.token_hex(4)}",
        thresholds=sparse_thresholds(len(policy.concept_names), dim, generator),
        special_thresholds=sparse_thresholds(len(policy.special_names), dim, generator),
        compat=None,
        escalate="review",
        digest="",
    )
    say(f"logging: building {config.decisions} decisions")
    records = build_records(policy, config.decisions, seed=config.seed)
    rows = []
    for spec in config.db_urls:
        with tempfile.TemporaryDirectory(prefix="moderation-bench-") as tmp:
            with scratch_database(spec, Path(tmp)) as (url, label):
                say(f"logging: {len(records)} decisions to {label}")
                rows.append(log_throughput(policy, records, url, label, Path(tmp), config))
    return rows


def build_records(policy: Any, n: int, *, seed: int = 0) -> list[DecisionRecord]:
    """`n` decision records as the Moderator logs them (float16 embedding of the model's width)."""
    from moderation.engine import Moderator
    from moderation.storage.records import record_of

    moderator = Moderator(policy)
    generator = torch.Generator().manual_seed(seed + 2)
    records = []
    with torch.inference_mode():
        for start in range(0, n, BUILD_CHUNK):
            count = min(BUILD_CHUNK, n - start)
            embeddings = torch.randn(count, policy.embed_dim, generator=generator)  # [n, D]
            metadata = [
                {"prompt": f"benchmark image {i}", "seed": i, "user": "bench"}
                for i in range(start, start + count)
            ]
            for i, d in enumerate(moderator.moderate_embeddings(embeddings, metadata=metadata)):
                d.image_sha256 = hashlib.sha256(f"{seed}:{start + i}".encode()).hexdigest()
                records.append(record_of(d))
    return records


@contextlib.contextmanager
def scratch_database(spec: str, folder: Path) -> Iterator[tuple[str, str]]:
    """(url, label) of a database to fill: a temporary SQLite file or a scratch PostgreSQL db."""
    import sqlite3

    from sqlalchemy import exc, make_url

    from moderation.storage import db
    from moderation.storage.errors import first_line

    if spec == "sqlite":
        yield f"sqlite:///{folder / 'bench.db'}", f"SQLite {sqlite3.sqlite_version} (temp file)"
        return
    url = db.resolve_db_url(spec)
    try:
        backend = make_url(url).get_backend_name()
    except (exc.ArgumentError, ValueError) as err:
        raise BenchError(
            f"--db-url {db.display_url(spec)!r}: {db.safe_reason(err, spec)}"
        ) from None
    if backend == "sqlite":
        yield url, f"SQLite {sqlite3.sqlite_version} ({db.display_url(url)})"
        return
    if backend != "postgresql":
        raise BenchError(
            f"--db-url {db.display_url(url)}: only SQLite and PostgreSQL are supported"
        )
    from moderation.bench.scratch import temporary_pg_database
    from moderation.storage import upgrade

    with contextlib.ExitStack() as stack:
        try:
            scratch = stack.enter_context(temporary_pg_database(url, prefix="moderation_bench"))
            upgrade(scratch)
            version = _server_version(scratch)
        except (exc.SQLAlchemyError, OSError) as err:
            raise BenchError(
                f"--db-url {db.display_url(url)}: cannot create a scratch database there (the "
                f"bench writes into a throwaway database and drops it): {first_line(err)}"
            ) from None
        yield scratch, f"PostgreSQL {version} (scratch db on {db.display_url(url)})"


def log_throughput(
    policy: Any,
    records: list[DecisionRecord],
    url: str,
    label: str,
    folder: Path,
    config: BenchConfig,
) -> dict[str, Any]:
    """Write every record through BackgroundDecisionLog, flush, then count what arrived."""
    from moderation.storage import DecisionLog, db
    from moderation.storage.background import BackgroundDecisionLog
    from moderation.storage.records import policy_record

    spool, held = folder / "spool", folder / "held"
    writer = BackgroundDecisionLog(DecisionLog(url, spool_dir=spool, held_dir=held))
    writer.register_policy(policy_record(policy))  # once per worker, not timed
    size = config.write_size
    in_write = 0.0
    start = time.perf_counter()
    for i in range(0, len(records), size):
        call = time.perf_counter()
        writer.write(records[i : i + size])
        in_write += time.perf_counter() - call
    writer.flush()
    seconds = time.perf_counter() - start
    writer.close()
    rows = _count(url, policy.digest)
    spooled = 0
    if rows < len(records):  # the database refused or was down: were they kept in the spool?
        with DecisionLog(url, spool_dir=spool, held_dir=held) as log:
            log.replay()
        spooled = _count(url, policy.digest) - rows
    db.dispose(url)
    calls = -(-len(records) // size)
    return {
        "database": label,
        "url": db.display_url(url),
        "decisions": len(records),
        "seconds": seconds,
        "per_second": len(records) / seconds,
        "rows": rows,
        "spooled": spooled,
        "lost": len(records) - rows - spooled,
        "failed": len(writer.failed),
        "write_calls": calls,
        "write_ms_mean": 1000 * in_write / calls,
        "transactions": writer.transactions,
        "rows_per_transaction": writer.records_written / max(writer.transactions, 1),
        "review_items": sum(r.needs_review for r in records),
        "embedding_dim": policy.embed_dim,
    }


def _count(url: str, digest: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            query = text("SELECT count(DISTINCT id) FROM decisions WHERE policy_digest = :digest")
            return int(conn.execute(query, {"digest": digest}).scalar_one())
    finally:
        engine.dispose()


def _server_version(url: str) -> str:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return str(conn.execute(text("SHOW server_version")).scalar_one()).split()[0]
    finally:
        engine.dispose()
