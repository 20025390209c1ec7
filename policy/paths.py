"""Files a policy names (base policies, embedding files, example folders) are paths relative to
its folder: this resolves one (following symbolic links) and refuses any that leads out of it."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class PathOutside(Exception):
    """A name that is absolute, unusable (NUL bytes, symlink loops, too long) or leads outside
    the folder; the message says which, ready to show."""


class Inside(NamedTuple):
    path: Path  # resolved
    exists: bool
    is_file: bool
    is_dir: bool


def resolve_inside(
    folder: Path,
    name: str,
    *,
    root: Path | None = None,
    kind: str = "file",
    relative: str = "a path relative to the policy's folder",
    shown: str | None = None,
) -> Inside:
    """`folder / name` resolved, when it stays inside `root` (default: `folder`), with what is
    there. PathOutside otherwise: `kind` (file or folder) and `relative` (what the name must
    be) word the messages; `shown` is the name as messages show it (default: quoted)."""
    if Path(name).is_absolute():
        raise PathOutside(f"'{name}' must be {relative}")
    try:
        path = (folder / name).resolve()  # follows symlinks: a link out is caught too
        inside = path.is_relative_to((root or folder).resolve())
        found = Inside(path, path.exists(), path.is_file(), path.is_dir())
    except (OSError, ValueError, RuntimeError) as exc:  # NUL bytes, symlink loops, long names
        raise PathOutside(f"'{name}' is not a usable {kind} name ({exc})") from None
    if not inside:
        raise PathOutside(f"{shown or repr(name)} is outside the policy's folder")
    return found
