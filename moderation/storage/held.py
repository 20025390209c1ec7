"""Held originals: content-addressed files (sha256) in an owner-only folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from moderation.storage.errors import StorageError
from moderation.storage.spool import fsync_dir
from policy.atomic import atomic_write

FOLDER_MODE = 0o700
FILE_MODE = 0o600


class HeldStore:
    """Stores image bytes as `<sha[:2]>/<sha>.png` under `folder`.

    `put` returns the path relative to the folder; the decision log records `absolute(...)` of it,
    so that a reader finds the file whatever its own held folder is. `get` takes either kind: a
    relative path (rows written before absolute paths were recorded) is looked up under `folder`.
    """

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)

    def put(self, data: bytes) -> str:
        """Store `data` durably (once per content) and return its path relative to the folder."""
        digest = hashlib.sha256(data).hexdigest()
        relative = f"{digest[:2]}/{digest}.png"
        target = self.folder / relative
        try:
            if target.exists() and target.stat().st_size == len(data):
                return relative
            self._make_folder(self.folder)
            self._make_folder(target.parent)
            atomic_write(target, data, mode=FILE_MODE)  # owner-only, whatever the umask
        except OSError as err:
            raise StorageError(f"cannot store held image in {self.folder}: {err}") from err
        return relative

    def absolute(self, relative: str) -> str:
        """The absolute path of a file `put` stored (what a decision row records)."""
        return str(self.folder.resolve() / relative)

    def path_of(self, held_path: str) -> Path:
        """Where a recorded held path points: an absolute one as is, a relative one under folder."""
        path = Path(held_path)
        return path if path.is_absolute() else self.folder / path

    def get(self, held_path: str) -> bytes:
        """The bytes stored at `held_path`, checked against the sha256 in the file name."""
        path = self.path_of(held_path)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise StorageError(f"cannot read held image {path}: {err.strerror}") from err
        if hashlib.sha256(data).hexdigest() != path.stem:
            raise StorageError(f"held image {path} is corrupt (its sha256 does not match its name)")
        return data

    def _make_folder(self, folder: Path) -> None:
        if not folder.is_dir():
            folder.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
            fsync_dir(folder.parent)
        if folder.stat().st_mode & 0o777 != FOLDER_MODE:
            os.chmod(folder, FOLDER_MODE)
