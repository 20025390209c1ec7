"""Atomic file writes: the one way this project writes a file whole.

A file is written to a temporary name of its own in the target's folder (random, created with
`O_CREAT | O_EXCL | O_NOFOLLOW`, so a link planted under any name is never followed and two
writers never share or delete each other's temporary file), flushed and fsynced, renamed over
the target (readers see the old file or the new one, never half of one), and the folder is
fsynced so that the rename survives a crash. On any failure the temporary file is removed and
the target is left as it was.

Used for every file the project writes: compiled policies and checker folders, `calibrate
--out`, imported checkers, prompt and image caches, `check --out` images, `review export -o`,
held originals and spool quarantine files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_file", "atomic_write", "fsync_folder", "temporary_name"]

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
_FLAGS |= getattr(os, "O_CLOEXEC", 0)


def temporary_name(path: Path) -> Path:
    """A fresh hidden name beside `path` (`.NAME.<random>.tmp`)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def fsync_folder(folder: Path) -> None:
    """Make a new or renamed directory entry durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF):  # file systems without folder fsync
            raise
    finally:
        os.close(fd)


def _mode_for(path: Path, mode: int | None) -> int | None:
    """The permissions of the new file: `mode`, else those of the file it replaces (None: the
    default 0o666 less the umask)."""
    if mode is not None:
        return mode
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None


@contextlib.contextmanager
def atomic_file(
    path: str | Path,
    *,
    text: bool = False,
    encoding: str = "utf-8",
    newline: str | None = None,
    mode: int | None = None,
    overwrite: bool = True,
    check: Callable[[Path], Any] | None = None,
) -> Iterator[IO[Any]]:
    """A file object whose contents replace `path` when the block ends without an error.

    text: a text file (`encoding`, `newline`), else binary. mode: the new file's permissions
    (default: those of the file replaced, else 0o666 less the umask). overwrite=False: an
    existing `path` is never replaced (FileExistsError), checked atomically at the end.
    check: called with the temporary file's path once it is complete, before it takes the
    target's place (an exception leaves the target untouched).
    """
    path = Path(path)
    folder = path.parent
    tmp = temporary_name(path)
    wanted = _mode_for(path, mode)
    fd = os.open(tmp, _FLAGS, 0o600 if wanted is not None else 0o666)
    try:
        if wanted is not None:
            os.fchmod(fd, wanted)
        file = (
            os.fdopen(fd, "w", encoding=encoding, newline=newline) if text else os.fdopen(fd, "wb")
        )
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    try:
        with file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        if check is not None:
            check(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
        fsync_folder(folder)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _link_new(tmp: Path, path: Path) -> None:
    """Give `tmp` the name `path` only if no such name exists (a hard link, then the temporary
    name goes); where hard links are not supported, a check then a rename."""
    try:
        os.link(tmp, path)  # fails if `path` exists, whatever it is: never clobbers
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def atomic_write(
    path: str | Path,
    data: bytes | str,
    *,
    encoding: str = "utf-8",
    mode: int | None = None,
    overwrite: bool = True,
) -> Path:
    """Write `data` (bytes, or text in `encoding`) as the whole of `path`, atomically."""
    path = Path(path)
    payload = data.encode(encoding) if isinstance(data, str) else data
    with atomic_file(path, mode=mode, overwrite=overwrite) as file:
        file.write(payload)
    return path
