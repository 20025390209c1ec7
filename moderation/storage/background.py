"""BackgroundDecisionLog: a DecisionLog written by a background thread, so moderation never waits
on the database.

`write()` only queues a batch; one writer thread takes whatever is queued and commits it as one
larger transaction (fewer fsyncs and round trips than one transaction per moderated batch). The
queue is bounded: a producer faster than the database blocks in `write()` (back-pressure) and a
record is never dropped. Durability is the wrapped DecisionLog's: a record is durable once it is
in the database or in the spool, which `flush()` waits for.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from moderation.errors import ModerationError
from moderation.storage.errors import PartlyRecordedError

if TYPE_CHECKING:
    from pathlib import Path

    from moderation.storage import DecisionLog, DecisionRecord, PolicyRecord

logger = logging.getLogger(__name__)

# Knobs: records queued but not yet durable before write() blocks (memory bound: ~2 KB each with a
# 768-wide float16 embedding), and the most records the thread commits in one transaction.
DEFAULT_MAX_PENDING = 20_000
DEFAULT_MAX_TRANSACTION = 2_000


class LogWriterError(ModerationError):
    """The background decision writer is closed, or its thread stopped."""


class BackgroundDecisionLog:
    """Queues decision batches for a writer thread that commits them in coalesced transactions.

    Drop-in for the DecisionLog methods Moderator uses (`register_policy`, `write`, `close`). A database outage never loses records: DecisionLog spools them. Any other failure
    in the thread is re-raised by the next `write()` or `flush()`; the records it refused are kept
    in `failed` (nothing is dropped silently).
    """

    def __init__(
        self,
        log: DecisionLog,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_transaction: int = DEFAULT_MAX_TRANSACTION,
    ) -> None:
        if max_pending < 1 or max_transaction < 1:
            raise ValueError("max_pending and max_transaction must be at least 1")
        self.log = log
        self.max_pending = max_pending
        self.max_transaction = max_transaction
        # Records the wrapped log could not record at all (a refused batch that it kept in the
        # spool is not among them; its error is still re-raised).
        self.failed: list[DecisionRecord] = []
        self.transactions = 0  # writes handed to the wrapped log
        self.records_written = 0  # records it took (committed or spooled)
        self._cond = threading.Condition()
        self._queue: deque[list[DecisionRecord]] = deque()
        self._unwritten = 0  # records queued or being written
        self._enqueued = 0  # batches ever queued; batches complete in queue order
        self._completed = 0  # batches handed to the wrapped log and returned (or failed)
        self._error: BaseException | None = None
        self._closing = False
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name="moderation-decision-writer", daemon=True
        )
        self._thread.start()
        # A daemon thread dies with the interpreter: flush what is queued before that happens.
        ref = weakref.ref(self)

        def close_at_exit() -> None:
            writer = ref()
            if writer is not None:
                writer.close()

        self._close_at_exit = close_at_exit
        atexit.register(close_at_exit)

    @classmethod
    def open(
        cls,
        url: str | None = None,
        *,
        spool_dir: Path | None = None,
        held_dir: Path | None = None,
        **options: int,
    ) -> BackgroundDecisionLog:
        """A BackgroundDecisionLog around `DecisionLog(url, spool_dir=..., held_dir=...)`."""
        from moderation.storage import DecisionLog

        return cls(DecisionLog(url, spool_dir=spool_dir, held_dir=held_dir), **options)

    # -- the DecisionLog interface -------------------------------------------------------------

    def register_policy(self, record: PolicyRecord) -> None:
        """Store a policy once per digest, synchronously (decisions refer to it)."""
        self._check_open()
        self.log.register_policy(record)

    def write(self, records: Iterable[DecisionRecord]) -> None:
        """Queue a batch; blocks while the queue is full. Raises a failure of an earlier batch."""
        batch = list(records)
        with self._cond:
            self._check_open()
            if batch:
                # An oversized batch is still taken once nothing else is waiting, never refused.
                while self._unwritten and self._unwritten + len(batch) > self.max_pending:
                    self._check_alive()
                    self._cond.wait(timeout=1.0)
                    self._check_open()
                self._queue.append(batch)
                self._unwritten += len(batch)
                self._enqueued += 1
                self._cond.notify_all()
            error = self._take_error()
        if error is not None:
            raise error  # this call's own batch is queued all the same

    def flush(self) -> None:
        """Wait until every batch queued so far is durable (database or spool)."""
        with self._cond:
            target = self._enqueued
            while self._completed < target:
                self._check_alive()
                self._cond.wait(timeout=1.0)
            error = self._take_error()
        if error is not None:
            raise error

    def replay(self) -> int:
        """Flush, then replay the spool into the database; returns decisions added."""
        self.flush()
        return self.log.replay()

    def close(self) -> None:
        """Flush, stop the thread and close the wrapped log; re-raises a pending failure."""
        with self._cond:
            if self._closed or self._closing:
                return
        try:
            self.flush()
        finally:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._thread.join()
            atexit.unregister(self._close_at_exit)
            self._closed = True
            self.log.close()
        with self._cond:
            error = self._take_error()  # raised by a batch queued while close() was flushing
        if error is not None:
            raise error

    def __enter__(self) -> BackgroundDecisionLog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The database URL of the wrapped log."""
        return self.log.url

    @property
    def held(self):
        """The held-original store of the wrapped log."""
        return self.log.held

    @property
    def pending(self) -> int:
        """Records queued or being written, not yet durable."""
        with self._cond:
            return self._unwritten

    # -- the writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return  # closing, and everything queued is written
                batches = [self._queue.popleft()]
                size = len(batches[0])
                while self._queue and size + len(self._queue[0]) <= self.max_transaction:
                    batches.append(self._queue.popleft())
                    size += len(batches[-1])
            # Anything but an Exception ends the thread with these batches unaccounted for, so
            # flush() and write() report the thread as stopped instead of returning.
            self._write(batches)
            with self._cond:
                self._unwritten -= size
                self._completed += len(batches)
                self._cond.notify_all()

    def _write(self, batches: list[list[DecisionRecord]]) -> None:
        """One transaction for all batches; if it fails, each batch on its own."""
        records = [r for batch in batches for r in batch]
        try:
            self.log.write(records)
            self.transactions += 1
            self.records_written += len(records)
            return
        except PartlyRecordedError as exc:  # all kept (in the spool): report, do not rewrite
            self.records_written += len(records)
            self._fail([], exc)
            return
        except Exception as exc:  # kept, and re-raised in the caller's thread
            if len(batches) == 1:
                self._fail(batches[0], exc)
                return
        # One bad batch must not take the others of its transaction down with it.
        for batch in batches:
            try:
                self.log.write(batch)
                self.transactions += 1
                self.records_written += len(batch)
            except PartlyRecordedError as exc:
                self.records_written += len(batch)
                self._fail([], exc)
            except Exception as exc:
                self._fail(batch, exc)

    def _fail(self, batch: list[DecisionRecord], exc: Exception) -> None:
        if batch:
            logger.error("the decision writer could not write %d decisions: %s", len(batch), exc)
        else:
            logger.error("the decision writer: %s", exc)
        with self._cond:
            self.failed.extend(batch)
            if self._error is None:
                self._error = exc

    # -- helpers -------------------------------------------------------------------------------

    def _take_error(self) -> BaseException | None:
        error, self._error = self._error, None
        return error

    def _check_open(self) -> None:
        if self._closing or self._closed:
            raise LogWriterError("this BackgroundDecisionLog is closed")

    def _check_alive(self) -> None:
        if not self._thread.is_alive():
            raise LogWriterError(
                f"the decision writer thread stopped with {self._unwritten} decisions unwritten"
            )
