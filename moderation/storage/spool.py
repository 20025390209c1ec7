"""Local spool for decisions the database could not take: append-only, checksummed, fsynced.

Layout: one file per writing process (`<time>-<host>-<pid>-<rand>.spool`), held under an
exclusive `flock` for the life of that process. Per-process files were chosen over one shared
file because a writer killed mid-append can then only tear the *end* of its own file: nobody
else ever appends after the torn bytes, so "truncate to the last good record" is always safe,
and writers of different processes never wait on each other. A replayer takes every file it can
lock (its own, and those whose process is gone); a live process's file stays locked and is left
alone. Files are created under a `.tmp` name and renamed once locked, so a replayer never grabs
a file between its creation and its lock.

Record: header `<4sBII` = magic b"MSPL", kind (1 policy, 2 decisions), payload length,
crc32(kind byte + payload); then the payload, compact JSON (arrays as base64). One record per
`write` batch, fsynced before `write` returns, so a batch is either wholly there or a torn tail.
Not thread-safe by itself: DecisionLog serializes calls under its lock.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moderation.storage.db import json_dumps
from moderation.storage.errors import StorageError

try:
    import fcntl
except ImportError:  # Windows: no flock; then use one writing process per spool folder
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("moderation.storage")

MAGIC = b"MSPL"
HEADER = struct.Struct("<4sBII")
KINDS = {"policy": 1, "decisions": 2}
KIND_NAMES = {v: k for k, v in KINDS.items()}
SUFFIX = ".spool"
MAX_RECORD_BYTES = 1 << 30  # a larger length field can only be garbage
FOLDER_MODE = 0o700
FILE_MODE = 0o600


class Spool:
    """The spool folder: appends to this process's file, and claims files for replay."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.discarded: list[str] = []  # reports of torn/corrupt tails cut off, for people
        self._own: tuple[int, Path, int] | None = None  # (pid, path, fd)
        self._claimed: dict[Path, int] = {}  # foreign files locked by us for replay -> fd

    # -- writing ---------------------------------------------------------------------------

    @property
    def own_path(self) -> Path | None:
        """This process's spool file, if it has one."""
        own = self._current_own()
        return own[1] if own else None

    def append(self, kind: str, payload: dict[str, Any]) -> None:
        """Append one record and fsync it; on failure nothing of it stays in the file."""
        body = json_dumps(payload).encode("utf-8")
        kind_byte = KINDS[kind]
        crc = zlib.crc32(body, zlib.crc32(bytes([kind_byte])))
        record = HEADER.pack(MAGIC, kind_byte, len(body), crc) + body
        try:
            _, path, fd = self._open_own()
            start = os.lseek(fd, 0, os.SEEK_END)
        except OSError as err:
            raise StorageError(f"cannot open the spool in {self.folder}: {err}") from err
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(fd, view) :]
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
        _lock(fd)
        os.rename(tmp, path)
        fsync_dir(self.folder)
        self._own = (os.getpid(), path, fd)
        return self._own

    # -- replay ----------------------------------------------------------------------------

    def has_pending(self) -> bool:
        """Whether any spool file exists (ours with data, or another process's)."""
        own = self._current_own()
        if own is not None and os.fstat(own[2]).st_size > 0:
            return True
        try:
            with os.scandir(self.folder) as entries:
                return any(
                    e.name.endswith(SUFFIX) and (own is None or Path(e.path) != own[1])
                    for e in entries
                )
        except FileNotFoundError:
            return False

    def claim(self) -> list[Path]:
        """Lock every replayable file (ours, and those of dead processes), oldest first."""
        own = self._current_own()
        paths: list[Path] = []
        try:
            names = sorted(n for n in os.listdir(self.folder) if n.endswith(SUFFIX))
        except FileNotFoundError:
            return paths
        for name in names:
            path = self.folder / name
            if own is not None and path == own[1]:
                if os.fstat(own[2]).st_size > 0:
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

    def entries(self, path: Path, kind: str) -> Iterator[dict[str, Any]]:
        """The payloads of one kind of record in a claimed file, in order."""
        fd = self._fd_of(path)
        for _, found, body in _scan(fd):
            if found == KINDS[kind]:
                yield json.loads(body)

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
            if os.fstat(fd).st_size == 0:
                path.unlink(missing_ok=True)
            os.close(fd)
        self._own = None

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
        """Truncate a file to its last good record; keep a copy of mid-file corruption."""
        good_end = max((end for end, _, _ in _scan(fd)), default=0)
        size = os.fstat(fd).st_size
        if good_end == size:
            return
        what = "a torn last record"
        if not _is_torn_tail(fd, good_end, size):
            # Not a crash artefact: set the bytes aside for a human instead of losing them.
            keep = path.with_name(f"{path.name}.corrupt-{good_end}")
            keep.write_bytes(os.pread(fd, size - good_end, good_end))
            what = f"corrupt records (copied to {keep.name})"
        os.ftruncate(fd, good_end)
        os.fsync(fd)
        report = f"{path}: discarded {size - good_end} bytes of {what} at offset {good_end}"
        log.warning("spool: %s", report)
        self.discarded.append(report)


def _scan(fd: int) -> Iterator[tuple[int, int, bytes]]:
    """Yield (end offset, kind, payload) of each good record, stopping at the first bad one."""
    offset = 0
    size = os.fstat(fd).st_size
    while offset + HEADER.size <= size:
        magic, kind, length, crc = HEADER.unpack(os.pread(fd, HEADER.size, offset))
        if magic != MAGIC or kind not in KIND_NAMES or length > MAX_RECORD_BYTES:
            return
        end = offset + HEADER.size + length
        if end > size:
            return
        body = os.pread(fd, length, offset + HEADER.size)
        if zlib.crc32(body, zlib.crc32(bytes([kind]))) != crc:
            return
        yield end, kind, body
        offset = end


def _is_torn_tail(fd: int, start: int, size: int) -> bool:
    """A crash leaves a prefix of the last record, or a full-length last record of junk/zeros."""
    if size - start < HEADER.size:
        return True
    magic, _, length, _ = HEADER.unpack(os.pread(fd, HEADER.size, start))
    if magic == MAGIC:
        return start + HEADER.size + length >= size
    return not os.pread(fd, size - start, start).strip(b"\0")


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
