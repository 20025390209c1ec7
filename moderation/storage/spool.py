"""Local spool for decisions the database could not take: append-only, checksummed, fsynced.

Layout: one file per writing process (`<time>-<host>-<pid>-<rand>.spool`), held under an
exclusive `flock` for the life of that process. Per-process files were chosen over one shared
file because a writer killed mid-append can then only tear the *end* of its own file: nobody
else ever appends after the torn bytes, so "truncate to the last good record" is always safe,
and writers of different processes never wait on each other. A replayer takes every file it can
lock (its own, and those whose process is gone); a live process's file stays locked and is left
alone. Files are created under a `.tmp` name and renamed once locked, so a replayer never grabs
a file between its creation and its lock.

Records (see `spool_format`) are checksummed JSON, one per `write` batch, fsynced before `write`
returns, so a batch is either wholly there or a torn tail. Each file starts with a `target` record
(the database its decisions are meant for). Records a replay could not store are moved to
`quarantine/` beside the files, in the same format, so that `moderation db replay --spool
DIR/quarantine` can retry them once the cause is fixed.
Not thread-safe by itself: DecisionLog serializes calls under its lock.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from moderation.storage.errors import StorageError
from moderation.storage.spool_format import (
    HEADER,
    SpoolRecord,
    SpoolRecordError,
    encode_record,
    is_torn_tail,
    scan,
)
from policy.atomic import atomic_write

try:
    import fcntl
except ImportError:  # Windows: no flock; then use one writing process per spool folder
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("moderation.storage")

__all__ = ["HEADER", "Spool", "SpoolRecord", "SpoolRecordError", "fsync_dir"]

SUFFIX = ".spool"
QUARANTINE = "quarantine"
FOLDER_MODE = 0o700
FILE_MODE = 0o600


class Spool:
    """The spool folder: appends to this process's file, and claims files for replay."""

    def __init__(self, folder: Path | str, target: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.target = target  # written first in every file this Spool creates
        self.discarded: list[str] = []  # reports of torn/corrupt tails cut off, for people
        self._own: tuple[int, Path, int] | None = None  # (pid, path, fd)
        self._own_empty = 0  # size of our file before its first decision or policy record
        self._claimed: dict[Path, int] = {}  # foreign files locked by us for replay -> fd

    # -- writing ---------------------------------------------------------------------------

    @property
    def own_path(self) -> Path | None:
        """This process's spool file, if it has one."""
        own = self._current_own()
        return own[1] if own else None

    def append(self, kind: str, payload: dict[str, Any]) -> None:
        """Append one record and fsync it; on failure nothing of it stays in the file."""
        try:
            record = encode_record(kind, payload)
        except (TypeError, ValueError) as err:
            raise StorageError(f"cannot spool a {kind} record: {err}") from err
        try:
            _, path, fd = self._open_own()
            start = os.lseek(fd, 0, os.SEEK_END)
        except OSError as err:
            raise StorageError(f"cannot open the spool in {self.folder}: {err}") from err
        self._write_at_end(path, fd, start, record)

    def _write_at_end(self, path: Path, fd: int, start: int, record: bytes) -> None:
        try:
            _write_all(fd, record)
            os.fsync(fd)
        except OSError as err:
            # Cut the partial record, and start a new file next time: should the cut fail too,
            # later records must not land after garbage (a replayer repairs this file's tail).
            try:
                os.ftruncate(fd, start)
            finally:
                self._own = None
                os.close(fd)
            raise StorageError(f"cannot write to the spool file {path}: {err}") from err

    def _current_own(self) -> tuple[int, Path, int] | None:
        if self._own is not None and self._own[0] != os.getpid():
            # Forked child: the file and its lock belong to the parent.
            self._own = None
        return self._own

    def _open_own(self) -> tuple[int, Path, int]:
        own = self._current_own()
        if own is not None:
            return own
        if not self.folder.is_dir():
            self.folder.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"{stamp}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp = self.folder / (name + ".tmp")
        path = self.folder / (name + SUFFIX)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, FILE_MODE)
        try:
            _lock(fd)
            if self.target is not None:
                # The target goes in before the file has its name: a replayer never sees a file
                # without it.
                _write_all(fd, encode_record("target", self.target))
                os.fsync(fd)
            os.rename(tmp, path)
            fsync_dir(self.folder)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self._own_empty = os.fstat(fd).st_size
        self._own = (os.getpid(), path, fd)
        return self._own

    # -- replay ----------------------------------------------------------------------------

    def has_pending(self, skip: Collection[str] = ()) -> bool:
        """Whether any spool file exists (ours with data, or another process's), but `skip`."""
        own = self._current_own()
        if own is not None and self._own_has_records(own):
            return True
        try:
            with os.scandir(self.folder) as entries:
                return any(
                    e.name.endswith(SUFFIX)
                    and e.name not in skip
                    and (own is None or Path(e.path) != own[1])
                    for e in entries
                )
        except FileNotFoundError:
            return False

    def claim(self, skip: Collection[str] = ()) -> list[Path]:
        """Lock every replayable file (ours, and those of dead processes) but `skip`, oldest first."""
        own = self._current_own()
        paths: list[Path] = []
        try:
            names = sorted(
                n for n in os.listdir(self.folder) if n.endswith(SUFFIX) and n not in skip
            )
        except FileNotFoundError:
            return paths
        for name in names:
            path = self.folder / name
            if own is not None and path == own[1]:
                if self._own_has_records(own):
                    paths.append(path)
            elif path in self._claimed or self._lock_foreign(path):
                paths.append(path)
        return paths

    def recover(self) -> list[str]:
        """Cut torn tails off the files of dead processes now; returns the reports."""
        before = len(self.discarded)
        self.claim()
        self.release_all()
        return self.discarded[before:]

    def records(self, path: Path) -> list[SpoolRecord]:
        """The intact records of a claimed file, in order."""
        return list(scan(self._fd_of(path)))

    def entries(self, path: Path, kind: str) -> list[dict[str, Any]]:
        """The payloads of one kind of record in a claimed file (SpoolRecordError if one is bad)."""
        return [r.payload() for r in self.records(path) if r.kind == kind]

    def target_of(self, path: Path) -> dict[str, Any] | None:
        """The database a claimed file is meant for (None: unknown, e.g. an older version's file).

        Only the first intact record is read: this version writes the target first."""
        first = next(scan(self._fd_of(path)), None)
        if first is None or first.kind != "target":
            return None
        try:
            return first.payload()
        except SpoolRecordError:
            return None

    def quarantine(self, source: Path, records: list[bytes]) -> Path:
        """Write records set aside from `source` to `quarantine/<source name>`, durably."""
        folder = self.folder / QUARANTINE
        target = folder / source.name
        try:
            if not folder.is_dir():
                folder.mkdir(mode=FOLDER_MODE, exist_ok=True)
                fsync_dir(self.folder)
            atomic_write(target, b"".join(records), mode=FILE_MODE)
        except OSError as err:
            raise StorageError(f"cannot write the quarantine file {target}: {err}") from err
        return target

    def remove(self, path: Path) -> None:
        """Delete a claimed file once every record in it is committed to the database."""
        own = self._current_own()
        if own is not None and path == own[1]:
            fd = own[2]
            self._own = None
        else:
            fd = self._claimed.pop(path)
        try:
            path.unlink(missing_ok=True)
            fsync_dir(self.folder)
        finally:
            os.close(fd)

    def release(self, path: Path) -> None:
        """Unlock one claimed file of another process without removing it."""
        fd = self._claimed.pop(path, None)
        if fd is not None:
            os.close(fd)

    def release_all(self) -> None:
        """Unlock the files of other processes that were claimed but not removed."""
        for fd in self._claimed.values():
            os.close(fd)
        self._claimed.clear()

    def close(self) -> None:
        """Unlock everything; our file stays for a later replay if it holds records."""
        self.release_all()
        own = self._current_own()
        if own is not None:
            _, path, fd = own
            if not self._own_has_records(own):
                path.unlink(missing_ok=True)
            os.close(fd)
        self._own = None

    def _own_has_records(self, own: tuple[int, Path, int]) -> bool:
        return os.fstat(own[2]).st_size > self._own_empty

    def _fd_of(self, path: Path) -> int:
        own = self._current_own()
        if own is not None and path == own[1]:
            return own[2]
        return self._claimed[path]

    def _lock_foreign(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            _lock(fd)
        except BlockingIOError:
            os.close(fd)  # a live process still writes it
            return False
        if os.fstat(fd).st_nlink == 0:  # replayed and removed by someone else meanwhile
            os.close(fd)
            return False
        self._claimed[path] = fd
        self._repair(fd, path)
        return True

    def _repair(self, fd: int, path: Path) -> None:
        """Copy damaged bytes aside for a human and cut a torn or damaged tail.

        Damage between intact records stays in the file (the scan skips it; the file goes once
        replayed); a damaged tail is cut, so that appends never land after garbage.
        """
        size = os.fstat(fd).st_size
        position = 0
        for record in [*scan(fd), None]:
            start = size if record is None else record.start
            if start > position:
                self._set_aside(fd, path, position, start, tail=record is None)
            if record is not None:
                position = record.end

    def _set_aside(self, fd: int, path: Path, start: int, end: int, *, tail: bool) -> None:
        what = "a torn last record"
        if not (tail and is_torn_tail(fd, start, end)):
            # Not a crash artefact: set the bytes aside for a human instead of losing them.
            keep = path.with_name(f"{path.name}.corrupt-{start}")
            data = os.pread(fd, end - start, start)
            if not tail and keep.exists() and keep.read_bytes() == data:
                return  # set aside by an earlier replay already
            atomic_write(keep, data, mode=FILE_MODE)
            what = f"corrupt records (copied to {keep.name})"
        if tail:
            os.ftruncate(fd, start)
            os.fsync(fd)
            report = f"{path}: discarded {end - start} bytes of {what} at offset {start}"
        else:
            report = (
                f"{path}: skipped {end - start} bytes of {what} at offset {start}; "
                "the records after them are kept"
            )
        log.warning("spool: %s", report)
        self.discarded.append(report)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _lock(fd: int) -> None:
    """Take the file's exclusive lock or raise BlockingIOError (held until the fd closes)."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def fsync_dir(folder: Path) -> None:
    """Make a new directory entry durable: fsync the directory that holds it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
