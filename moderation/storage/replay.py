"""Replay of spool files into the database, one file at a time.

A file meant for another database (its `target` record) is left alone unless the caller says
otherwise. Within a file, records the database refuses, and records that cannot be read, are
moved to the spool's `quarantine/` folder and named in the report (decision ids, file), and the
replay goes on: one bad record never blocks the others. A database that is down or has the wrong
schema stops the replay with nothing lost (files are removed only once every record is
committed or quarantined; replays are idempotent by decision id).
"""

from __future__ import annotations

import binascii
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from moderation.storage import inserts
from moderation.storage.errors import (
    DatabaseConfigurationError,
    DatabaseUnavailableError,
    SchemaVersionError,
    first_line,
)
from moderation.storage.models import DecisionRow
from moderation.storage.records import row_from_json
from moderation.storage.spool import Spool, SpoolRecord, SpoolRecordError
from moderation.storage.spool_format import encode_record

# Errors that stop a replay (retry later, or fix the configuration), as opposed to a refusal of
# particular records: a read-only standby or a restarting server never quarantines anything.
STOP = (DatabaseUnavailableError, SchemaVersionError, DatabaseConfigurationError)
_COLUMNS = DecisionRow.__table__.columns
_REQUIRED = frozenset(c.name for c in _COLUMNS if not c.nullable)
# Columns added since a file was spooled are nullable: an older version's rows replay with NULL.
_OPTIONAL = tuple(c.name for c in _COLUMNS if c.nullable)

Transaction = Callable[[], AbstractContextManager[Connection]]


@dataclass
class ReplayReport:
    """What a replay did: decisions added, records set aside, files left for another database."""

    added: int = 0
    quarantined: list[str] = field(default_factory=list)  # one line per problem, for people
    quarantined_ids: list[str] = field(default_factory=list)
    other_database: list[str] = field(default_factory=list)  # one line per file left alone
    other_files: list[str] = field(default_factory=list)  # their names


@dataclass
class _Batch:
    """The decisions of one spooled record, decoded, with their JSON form for a quarantine."""

    record: SpoolRecord
    json_rows: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    reviews: list[dict[str, Any] | None]


@dataclass
class _FileWork:
    """What one file's replay set aside."""

    refused_rows: list[tuple[_Batch, int, str]] = field(default_factory=list)
    unreadable: list[tuple[SpoolRecord, str]] = field(default_factory=list)
    refused_policies: list[tuple[dict[str, Any], str]] = field(default_factory=list)


class Replayer:
    """Replays claimed spool files through `transaction()` (a write transaction per call)."""

    def __init__(
        self, spool: Spool, transaction: Transaction, database: str, *, chunk_rows: int
    ) -> None:
        self.spool = spool
        self.transaction = transaction
        self.database = database  # `db.database_identity` of the database replayed into
        self.chunk_rows = chunk_rows

    def run(self, paths: list[Path], *, into_other_database: bool = False) -> ReplayReport:
        """Replay every file in `paths` (claimed); files for another database are left alone.

        The policies of every file go in first (a decision may refer to a policy that an earlier
        file of the same process carries), then each file's decisions.
        """
        report = ReplayReport()
        mine: list[Path] = []
        for path in paths:
            target = self.spool.target_of(path)
            if into_other_database or (target or {}).get("database") == self.database:
                mine.append(path)
                continue
            if target is None:
                why = "does not say which database it is for (an earlier version wrote it)"
            else:
                why = f"is meant for {target.get('url') or target.get('database')}"
            report.other_database.append(f"{path}: {why}")
            report.other_files.append(path.name)
            self.spool.release(path)
        records = {path: self.spool.records(path) for path in mine}
        work = {path: _FileWork() for path in mine}
        policies = []
        for path in mine:
            for record in records[path]:
                if record.kind == "policy":
                    try:
                        policies.append((path, record.payload()))
                    except SpoolRecordError as err:
                        work[path].unreadable.append((record, str(err)))
        for path, policy, why in self._store_policies(policies):
            work[path].refused_policies.append((policy, why))
        for path in mine:
            report.added += self._replay_file(path, records[path], work[path], report)
        return report

    # -- one file --------------------------------------------------------------------------

    def _replay_file(
        self, path: Path, records: list[SpoolRecord], work: _FileWork, report: ReplayReport
    ) -> int:
        batches = []
        for record in records:
            if record.kind == "decisions":
                try:
                    batches.append(_decode(record))
                except SpoolRecordError as err:
                    work.unreadable.append((record, str(err)))
        added = self._store(batches, work)
        if work.refused_rows or work.unreadable or work.refused_policies:
            kept = self.spool.quarantine(path, _quarantine_records(records, work))
            _describe(path, kept, work, report)
        # Only now, with every record committed or quarantined, may the file go.
        self.spool.remove(path)
        return added

    def _store_policies(
        self, policies: list[tuple[Path, dict[str, Any]]]
    ) -> list[tuple[Path, dict[str, Any], str]]:
        """Insert policies (first row per digest wins); returns those refused, with why."""
        if not policies:
            return []
        try:
            with self.transaction() as conn:
                inserts.insert_policies(conn, [policy for _, policy in policies])
            return []
        except STOP:
            raise
        except Exception:
            pass  # find out which one, below
        refused = []
        for path, policy in policies:
            try:
                with self.transaction() as conn:
                    inserts.insert_policies(conn, [policy])
            except STOP:
                raise
            except Exception as err:
                refused.append((path, policy, first_line(err)))
        return refused

    def _store(self, batches: list[_Batch], work: _FileWork) -> int:
        """Commit in transactions of about `chunk_rows` decisions; refusals are narrowed down."""
        added, chunk, size = 0, [], 0
        for batch in batches:
            chunk.append(batch)
            size += len(batch.rows)
            if size >= self.chunk_rows:
                added += self._store_chunk(chunk, work)
                chunk, size = [], 0
        return added + self._store_chunk(chunk, work)

    def _store_chunk(self, chunk: list[_Batch], work: _FileWork) -> int:
        if not chunk:
            return 0
        try:
            return self._insert(
                [r for b in chunk for r in b.rows], [v for b in chunk for v in b.reviews]
            )
        except STOP:
            raise
        except Exception as err:
            if len(chunk) == 1 and len(chunk[0].rows) == 1:
                work.refused_rows.append((chunk[0], 0, first_line(err)))
                return 0
        if len(chunk) > 1:  # which record?
            return sum(self._store_chunk([batch], work) for batch in chunk)
        (batch,) = chunk  # which decision of the record?
        added = 0
        for i, (row, review) in enumerate(zip(batch.rows, batch.reviews, strict=True)):
            try:
                added += self._insert([row], [review])
            except STOP:
                raise
            except Exception as err:
                work.refused_rows.append((batch, i, first_line(err)))
        return added

    def _insert(self, rows: list[dict[str, Any]], reviews: list[dict[str, Any] | None]) -> int:
        if not rows:
            return 0
        with self.transaction() as conn:
            return inserts.insert_decisions(conn, rows, reviews)


def _decode(record: SpoolRecord) -> _Batch:
    """The decisions of a record; SpoolRecordError when it is not what this version writes."""
    payload = record.payload()
    json_rows, reviews = payload.get("rows"), payload.get("reviews")
    if not isinstance(json_rows, list) or not isinstance(reviews, list):
        raise SpoolRecordError("it has no `rows` and `reviews` lists")
    if len(json_rows) != len(reviews):
        raise SpoolRecordError(f"it has {len(json_rows)} rows but {len(reviews)} reviews")
    rows = []
    for i, data in enumerate(json_rows):
        if not isinstance(data, dict) or not _REQUIRED <= data.keys():
            raise SpoolRecordError(f"its row {i} is not a complete decisions row")
        try:
            rows.append(row_from_json({**dict.fromkeys(_OPTIONAL), **data}))
        except (TypeError, ValueError, binascii.Error) as err:
            raise SpoolRecordError(f"its row {i} cannot be decoded ({err})") from err
    for i, review in enumerate(reviews):
        if review is not None and not (
            isinstance(review, dict) and {"priority", "margin"} <= set(review)
        ):
            raise SpoolRecordError(f"its review {i} is not a review item")
    return _Batch(record, json_rows, rows, reviews)


def _quarantine_records(records: list[SpoolRecord], work: _FileWork) -> list[bytes]:
    """A spool file of its own: the target and policies of the source, then what was set aside."""
    kept = [r.raw() for r in records if r.kind in ("target", "policy")]
    if work.refused_rows:
        payload = {
            "rows": [b.json_rows[i] for b, i, _ in work.refused_rows],
            "reviews": [b.reviews[i] for b, i, _ in work.refused_rows],
            "refused": [why for _, _, why in work.refused_rows],
        }
        kept.append(encode_record("decisions", payload))
    kept += [r.raw() for r, _ in work.unreadable]
    return kept


def _describe(path: Path, kept: Path, work: _FileWork, report: ReplayReport) -> None:
    for policy, why in work.refused_policies:
        report.quarantined.append(
            f"{path}: the database refused policy {policy.get('name')!r} "
            f"({str(policy.get('digest'))[:12]}): {why}; kept in {kept}"
        )
    by_reason: dict[str, list[str]] = {}
    for batch, i, why in work.refused_rows:
        by_reason.setdefault(why, []).append(str(batch.rows[i]["id"]))
    for why, ids in by_reason.items():
        report.quarantined_ids += ids
        report.quarantined.append(
            f"{path}: quarantined {len(ids)} decision(s) the database refused "
            f"({', '.join(ids)}): {why}; kept in {kept}"
        )
    for record, why in work.unreadable:
        report.quarantined.append(
            f"{path}: quarantined the unreadable {record.kind} record at offset {record.start}: "
            f"{why}; kept in {kept}"
        )
