"""DecisionLog: batched, idempotent decision writes that fall back to the spool when the DB is down.

What `write()` guarantees: a batch is committed to the database, or kept in the spool (the
database is down, has the wrong schema or refused the batch), or `UnrecordedError` names every
decision of it that is recorded nowhere. Nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import Connection, Engine, Table, select

from moderation.storage import db, inserts, schema
from moderation.storage.errors import (
    DatabaseConfigurationError,
    DatabaseUnavailableError,
    OtherDatabaseError,
    PartlyRecordedError,
    SchemaVersionError,
    StorageError,
    UnrecordedError,
    database_errors,
    display_url,
)
from moderation.storage.held import HeldStore, user_held_dir
from moderation.storage.models import DecisionRow
from moderation.storage.records import (
    DecisionRecord,
    PolicyRecord,
    decision_row,
    policy_row,
    record_from_row,
    review_of,
    row_to_json,
)
from moderation.storage.replay import Replayer, ReplayReport
from moderation.storage.spool import Spool
from moderation.storage.storable import check_policy_record

log = logging.getLogger("moderation.storage")

SPOOL_DIR_ENV = "MODERATION_SPOOL_DIR"
HELD_DIR_ENV = "MODERATION_HELD_DIR"


def default_spool_dir() -> Path:
    """Where decisions wait while the database is unreachable: $MODERATION_SPOOL_DIR, else ./spool."""
    return Path(os.environ.get(SPOOL_DIR_ENV) or "spool")


def default_held_dir() -> Path:
    """Where held originals live: $MODERATION_HELD_DIR, else a per-user data folder
    (`held/` in platformdirs' user data folder for `moderation`, e.g.
    ~/.local/share/moderation/held), never the working directory."""
    return Path(os.environ.get(HELD_DIR_ENV) or user_held_dir())


# Knobs: after the database fails, writes go straight to the spool for a while (doubling from
# RETRY_MIN_S up to RETRY_MAX_S) instead of paying a connect timeout per batch.
RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0
# Replay commits spooled batches in transactions of about this many decisions.
REPLAY_CHUNK_ROWS = 5000

_DECISIONS: Table = DecisionRow.__table__  # type: ignore[assignment]


@dataclass
class LogCounts:
    """Where the decisions handed to one DecisionLog went (for summaries such as `check`'s)."""

    logged: int = 0  # committed to the database by write()
    spooled: int = 0  # kept in the spool: the database was unreachable
    refused: int = 0  # kept in the spool: the database refused them or has the wrong schema
    replayed: int = 0  # spooled decisions (of any run) this log replayed into the database
    quarantined: int = 0  # spooled decisions a replay set aside in the quarantine folder


class _HeldProblem(NamedTuple):
    message: str
    decision_ids: list[str]


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
        self.database = db.database_identity(self.url)  # also refuses a malformed URL
        target = {"url": display_url(self.url), "database": self.database}
        self.spool = Spool(default_spool_dir() if spool_dir is None else spool_dir, target)
        self.held = HeldStore(default_held_dir() if held_dir is None else held_dir)
        self.counts = LogCounts()
        self.quarantined: list[str] = []  # reports of spooled records a replay set aside
        self.last_replay: ReplayReport | None = None
        self._lock = threading.RLock()
        self._ready = False
        self._retry_at = 0.0
        self._backoff = 0.0
        self._unavailable: Exception | None = None  # why the database is down, while it is
        self._closed = False
        self._auto_replay = True  # off once a replay fails on bad data, until replay() works
        self._other_database: set[str] = set()  # spool files automatic replays leave alone
        # digest -> row of every policy registered here, to make each spool file self-contained
        self._policies: dict[str, dict[str, Any]] = {}
        self._spooled_policies: tuple[Path | None, set[str]] = (None, set())
        with self._spool_io():
            self.spool.recover()  # cut torn tails left by crashed processes (in .discarded)

    # -- public API ------------------------------------------------------------------------

    def register_policy(self, record: PolicyRecord) -> None:
        """Store a policy once per digest (spooled if the database is down).

        A policy whose names do not fit the log's columns is refused here, before any decision.
        """
        check_policy_record(record)
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
                except DatabaseConfigurationError:
                    raise  # no such database, no schema, bad credentials: nothing to spool for
                except SchemaVersionError:
                    self._spool_policies([record.digest])
                    raise
            self._spool_policies([record.digest])

    def write(self, records: list[DecisionRecord]) -> None:
        """Insert a batch in one transaction (idempotent by id), else keep it in the spool.

        Raises PartlyRecordedError when the batch is kept but not as it should be (the database
        refused it or has the wrong schema, or held originals could not be stored), and
        UnrecordedError, naming the decisions, when the spool cannot take it either.
        """
        if not records:
            return
        with self._lock:
            self._check_open()
            rows, held_problem = self._rows(records)
            reviews = [review_of(r) for r in records]
            refusal: Exception | None = None
            if self._database_worth_trying():
                try:
                    self._replay_before_write()
                    with self._transaction() as conn:
                        inserts.insert_decisions(conn, rows, reviews)
                    self._succeeded()
                except DatabaseUnavailableError as err:
                    self._failed(err)
                except DatabaseConfigurationError as err:
                    # The database named cannot work as configured: spooling would only hide
                    # that (and leave a spool for a database that never existed).
                    raise UnrecordedError(
                        f"{err}; the {len(rows)} decisions are recorded nowhere",
                        [r["id"] for r in rows],
                    ) from err
                except Exception as err:  # refused, wrong schema, anything: never drop a batch
                    refusal = err
                else:
                    self.counts.logged += len(rows)
                    self._report_held(held_problem)
                    return
            try:
                self._spool_decisions(rows, reviews)
            except StorageError as err:
                if refusal is not None:
                    why = f"the database refused them ({refusal})"
                else:
                    why = str(self._unavailable or f"database {display_url(self.url)} is down")
                raise UnrecordedError(
                    f"{why}, and the spool cannot take them: {err}", [r["id"] for r in rows]
                ) from err
            if refusal is None:
                self.counts.spooled += len(rows)
                self._report_held(held_problem)
                return
            self.counts.refused += len(rows)
            hint = (
                "run `moderation db upgrade`, then `moderation db replay`"
                if isinstance(refusal, SchemaVersionError)
                else "a replay quarantines what the database refuses again"
            )
            message = (
                f"{refusal}; the {len(rows)} decisions are kept in the spool {self.spool.folder}"
                f" ({hint})"
            )
            if held_problem is not None:
                message += f"; {held_problem.message}"
            raise PartlyRecordedError(message, [r["id"] for r in rows]) from refusal

    def replay(self, *, into_other_database: bool = False) -> int:
        """Write every replayable spool file to the database; returns decisions added.

        Records the database refuses are quarantined (see `quarantined`). Files written for
        another database are left alone, and OtherDatabaseError says so after the others are
        replayed, unless `into_other_database` is set.
        """
        with self._lock:
            self._check_open()
            report = self._replay(into_other_database=into_other_database)
            self._succeeded()
            self._auto_replay = True
            if report.other_database:
                files = "; ".join(report.other_database)
                raise OtherDatabaseError(
                    f"replayed {report.added} decisions into {display_url(self.url)}, and left "
                    f"{len(report.other_database)} spool file(s) alone: {files} "
                    "(replay them with --db set to their database, or pass "
                    "--into-other-database to replay them here)"
                )
            return report.added

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

    # -- rows ------------------------------------------------------------------------------

    def _rows(self, records: list[DecisionRecord]) -> tuple[list[dict], _HeldProblem | None]:
        """Rows of the records; held originals go to disk first (a row never points at a
        missing file). A row records the absolute path, so readers with another held folder
        still find it; an original that cannot be stored leaves its row without one."""
        rows, missing, problem = [], [], None
        for r in records:
            held_path = None
            if r.held_image is not None:
                try:
                    held_path = self.held.absolute(self.held.put(r.held_image))
                except StorageError as err:
                    missing.append(r.id)
                    problem = problem or err
            rows.append(decision_row(r, held_path))
        if not missing:
            return rows, None
        message = (
            f"{problem}: the originals of {len(missing)} decisions are not held and cannot be "
            f"released ({', '.join(missing)})"
        )
        return rows, _HeldProblem(message, missing)

    def _report_held(self, problem: _HeldProblem | None) -> None:
        if problem is not None:
            raise PartlyRecordedError(problem.message, problem.decision_ids)

    # -- database --------------------------------------------------------------------------

    def _engine(self) -> Engine:
        engine = db.engine_for(self.url)
        if not self._ready:
            schema.ensure_schema(self.url, migrate_fresh=True)
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
        self._unavailable = None

    def _failed(self, err: Exception) -> None:
        self._unavailable = err
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
            if not self._auto_replay or not self.spool.has_pending(self._other_database):
                return
        try:
            report = self._replay(skip=self._other_database)
        except (DatabaseUnavailableError, SchemaVersionError, DatabaseConfigurationError):
            raise
        except StorageError as err:
            # A spool that cannot be replayed must not block new decisions, nor be retried on
            # every batch; an explicit replay (`moderation db replay`) shows the error.
            log.warning("spool replay failed, keeping the spool: %s", err)
            self._auto_replay = False
            return
        for line in report.other_database:
            log.warning("spool: left %s (`moderation db replay` says more)", line)
        self._other_database.update(report.other_files)
        if report.added:
            log.warning(
                "replayed %d spooled decisions into %s", report.added, display_url(self.url)
            )

    def _replay(self, *, into_other_database: bool = False, skip=()) -> ReplayReport:
        replayer = Replayer(
            self.spool, self._transaction, self.database, chunk_rows=REPLAY_CHUNK_ROWS
        )
        try:
            with self._spool_io():
                report = replayer.run(
                    self.spool.claim(skip), into_other_database=into_other_database
                )
        finally:
            self.spool.release_all()
        self.counts.replayed += report.added
        self.counts.quarantined += len(report.quarantined_ids)
        for line in report.quarantined:
            log.error("spool: %s", line)
        self.quarantined += report.quarantined
        self.last_replay = report
        return report

    @contextlib.contextmanager
    def _spool_io(self) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            raise StorageError(f"cannot read the spool folder {self.spool.folder}: {err}") from err

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("this DecisionLog is closed")
