"""Held originals: content-addressed files (sha256) in an owner-only folder.

They are the most sensitive files the engine writes (images judged unsafe, waiting for a
person). By default they go to a per-user data folder, never the working directory; the first
time a held folder is created, a warning says where, and says so louder when the folder is
inside a git checkout and not ignored by git (held images must never be committed).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from pathlib import Path

from moderation.storage.errors import StorageError
from moderation.storage.spool import fsync_dir
from policy.atomic import atomic_write

FOLDER_MODE = 0o700
FILE_MODE = 0o600

log = logging.getLogger("moderation.storage")


def user_held_dir() -> Path:
    """`held/` in this user's data folder for `moderation` (platformdirs)."""
    from platformdirs import user_data_path

    return user_data_path("moderation", appauthor=False) / "held"


def git_checkout_of(folder: Path) -> Path | None:
    """The root of the git checkout `folder` is in (a parent holding `.git`), if any."""
    for parent in [folder, *folder.parents]:
        if (parent / ".git").exists():
            return parent
    return None


def _ignored_by_git(root: Path, folder: Path) -> bool:
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "check-ignore", "-q", str(folder)],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False  # no git: say so, to be safe
    return done.returncode == 0


def announce(folder: Path) -> str:
    """The warning given when a held folder is created (logged, and returned for tests)."""
    where = folder.resolve()
    message = (
        f"held originals (images waiting for review) are kept in {where} (owner-only); set "
        "MODERATION_HELD_DIR or held_dir= to keep them elsewhere"
    )
    root = git_checkout_of(where)
    if root is not None and not _ignored_by_git(root, where):
        message += (
            f"; WARNING: {where} is inside the git checkout {root} and not ignored by git: add "
            "it to .gitignore, or keep held originals outside the checkout"
        )
    log.warning("%s", message)
    return message


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
            if folder == self.folder:
                announce(folder)
        if folder.stat().st_mode & 0o777 != FOLDER_MODE:
            os.chmod(folder, FOLDER_MODE)
