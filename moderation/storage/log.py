"""DecisionLog: batched, idempotent decision writes that fall back to the spool when the DB is down."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Table, select

from moderation.storage import db, inserts, schema
from moderation.storage.errors import (
    DatabaseUnavailableError,
    SchemaVersionError,
    StorageError,
    database_errors,
    display_url,
)
from moderation.storage.held import HeldStore
from moderation.storage.models import DecisionRow
from moderation.storage.records import (
    DecisionRecord,
    PolicyRecord,
    decision_row,
    policy_row,
    record_from_row,
    review_of,
    row_from_json,
    row_to_json,
)
from moderation.storage.spool import Spool

log = logging.getLogger("moderation.storage")

SPOOL_DIR_ENV = "MODERATION_SPOOL_DIR"
HELD_DIR_ENV = "MODERATION_HELD_DIR"


def default_spool_dir() -> Path:
    """Where decisions wait while the database is unreachable: $MODERATION_SPOOL_DIR, else ./spool."""
    return Path(os.environ.get(SPOOL_DIR_ENV) or "spool")


def default_held_dir() -> Path:
    """Where held originals live: $MODERATION_HELD_DIR, else ./held."""
    return Path(os.environ.get(HELD_DIR_ENV) or "held")


# Knobs: after the database fails, writes go straight to the spool for a while (doubling from
# RETRY_MIN_S up to RETRY_MAX_S) instead of paying a connect timeout per batch.
RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0
# Replay commits spooled batches in transactions of about this many decisions.
REPLAY_CHUNK_ROWS = 5000

_DECISIONS: Table = DecisionRow.__table__  # type: ignore[assignment]


class DecisionLog:
    """Writes decisions (and their review items) to SQL; thread-safe; spools when the DB is down."""

    def __init__(
        self,
        url: str | None = None,
        *,
        spool_dir: Path | None = None,
        held_dir: Path | None = None,
    ) -> None:
        self.url = db.resolve_db_url(url)
        self.spool = Spool(default_spool_dir() if spool_dir is None else spool_dir)
        self.held = HeldStore(default_held_dir() if held_dir is None else held_dir)
        self._lock = threading.RLock()
        self._ready = False
        self._retry_at = 0.0
        self._backoff = 0.0
        self._closed = False
        self._auto_replay = True  # off once a replay fails on bad data, until replay() works
        # digest -> row of every policy registered here, to make each spool file self-contained
        self._policies: dict[str, dict[str, Any]] = {}
        self._spooled_policies: tuple[Path | None, set[str]] = (None, set())
        with self._spool_io():
            self.spool.recover()  # cut torn tails left by crashed processes (in .discarded)

    # -- public API ------------------------------------------------------------------------

    def register_policy(self, record: PolicyRecord) -> None:
        """Store a policy once per digest (spooled if the database is down)."""
        row = policy_row(record)
        with self._lock:
            self._check_open()
            self._policies[record.digest] = row
            if self._database_worth_trying():
                try:
                    with self._transaction() as conn:
                        inserts.insert_policies(conn, [row])
                    self._succeeded()
                    return
                except DatabaseUnavailableError as err:
                    self._failed(err)
                except SchemaVersionError:
                    self._spool_policies([record.digest])
                    raise
            self._spool_policies([record.digest])

    def write(self, records: list[DecisionRecord]) -> None:
        """Insert a batch in one transaction (idempotent by id); spool it if the DB is down."""
        if not records:
            return
        with self._lock:
            self._check_open()
            # Held originals go to disk first: a row must never point at a missing file. It
            # records the absolute path, so readers with another held folder still find it.
            held = self.held
            rows = [
                decision_row(
                    r, None if r.held_image is None else held.absolute(held.put(r.held_image))
                )
                for r in records
            ]
            reviews = [review_of(r) for r in records]
            if self._database_worth_trying():
                try:
                    self._replay_before_write()
                    with self._transaction() as conn:
                        inserts.insert_decisions(conn, rows, reviews)
                    self._succeeded()
                    return
                except DatabaseUnavailableError as err:
                    self._failed(err)
                except SchemaVersionError as err:
                    # Wrong schema: keep the batch, but tell the caller loudly.
                    self._spool_decisions(rows, reviews)
                    raise StorageError(
                        f"{err}; {len(rows)} decisions were kept in the spool {self.spool.folder}"
                        " (run `moderation db replay` after upgrading)"
                    ) from err
            self._spool_decisions(rows, reviews)

    def replay(self) -> int:
        """Write every replayable spool file to the database; returns decisions added."""
        with self._lock:
            self._check_open()
            added = self._replay()
            self._succeeded()
            self._auto_replay = True
            return added

    def get(self, decision_id: str) -> DecisionRecord | None:
        """The stored decision with this id (arrays decoded), or None."""
        with self._lock, self._reading() as conn:
            row = conn.execute(select(_DECISIONS).where(_DECISIONS.c.id == decision_id)).first()
        return None if row is None else record_from_row(row._asdict())

    def flush(self) -> None:
        """Nothing to wait for: write() returns once a batch is durable."""

    def close(self) -> None:
        """Release the spool file locks; the shared engine stays cached for other users."""
        with self._lock:
            if not self._closed:
                self.spool.close()
                self._closed = True

    def __enter__(self) -> DecisionLog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- database --------------------------------------------------------------------------

    def _engine(self) -> Engine:
        engine = db.engine_for(self.url)
        if not self._ready:
            schema.ensure_schema(self.url)
            self._ready = True
        return engine

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Driver errors become StorageError (DatabaseUnavailableError when the DB is down)."""
        with database_errors(
            self.url, refused_hint=" (is the policy of every decision registered first?)"
        ):
            yield

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A write transaction (`BEGIN IMMEDIATE` on SQLite), committed on exit."""
        with self._errors(), db.immediate_transaction(self._engine()) as conn:
            yield conn

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Connection]:
        with self._errors(), self._engine().connect() as conn:
            yield conn

    def _database_worth_trying(self) -> bool:
        return time.monotonic() >= self._retry_at

    def _succeeded(self) -> None:
        if self._backoff:
            log.warning("database %s is reachable again", display_url(self.url))
        self._backoff = 0.0
        self._retry_at = 0.0

    def _failed(self, err: Exception) -> None:
        if not self._backoff:
            log.warning("%s; spooling decisions to %s", err, self.spool.folder)
        self._backoff = min(max(RETRY_MIN_S, self._backoff * 2), RETRY_MAX_S)
        self._retry_at = time.monotonic() + self._backoff

    # -- spool -----------------------------------------------------------------------------

    def _spool_policies(self, digests: Iterable[str]) -> None:
        path, done = self._spooled_policies
        if path != self.spool.own_path:
            done = set()
        for digest in digests:
            if digest in self._policies and digest not in done:
                self.spool.append("policy", self._policies[digest])
                done.add(digest)
        self._spooled_policies = (self.spool.own_path, done)

    def _spool_decisions(self, rows: list[dict], reviews: list[dict | None]) -> None:
        # Each spool file carries the policies its decisions need, so it replays anywhere.
        self._spool_policies({row["policy_digest"] for row in rows})
        payload = {"rows": [row_to_json(r) for r in rows], "reviews": reviews}
        self.spool.append("decisions", payload)

    def _replay_before_write(self) -> None:
        with self._spool_io():
            if not self._auto_replay or not self.spool.has_pending():
                return
        try:
            added = self._replay()
        except (DatabaseUnavailableError, SchemaVersionError):
            raise
        except StorageError as err:
            # A poisoned spool must not block new decisions, nor be retried on every batch;
            # an explicit replay (`moderation db replay`) shows the error.
            log.warning("spool replay failed, keeping the spool: %s", err)
            self._auto_replay = False
            return
        if added:
            log.warning("replayed %d spooled decisions into %s", added, display_url(self.url))

    def _replay(self) -> int:
        with self._spool_io():
            return self._replay_claimed(self.spool.claim())

    def _replay_claimed(self, paths: list[Path]) -> int:
        try:
            if not paths:
                return 0
            policies = [row for path in paths for row in self.spool.entries(path, "policy")]
            if policies:
                with self._transaction() as conn:
                    inserts.insert_policies(conn, policies)
            added = 0
            for path in paths:
                rows: list[dict] = []
                reviews: list[dict | None] = []
                for payload in self.spool.entries(path, "decisions"):
                    rows += [row_from_json(r) for r in payload["rows"]]
                    reviews += payload["reviews"]
                    if len(rows) >= REPLAY_CHUNK_ROWS:
                        added += self._commit_chunk(rows, reviews)
                        rows, reviews = [], []
                added += self._commit_chunk(rows, reviews)
                # Only now, with every record of the file committed, may it go.
                self.spool.remove(path)
            return added
        finally:
            self.spool.release_all()

    @contextlib.contextmanager
    def _spool_io(self) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            raise StorageError(f"cannot read the spool folder {self.spool.folder}: {err}") from err

    def _commit_chunk(self, rows: list[dict], reviews: list[dict | None]) -> int:
        if not rows:
            return 0
        with self._transaction() as conn:
            return inserts.insert_decisions(conn, rows, reviews)

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("this DecisionLog is closed")
