"""How many decisions wait in a spool folder, and how many a replay set aside in its quarantine.

Read without taking any lock (a live process's file is read as it stands), for `moderation db
status` and for the line a replay ends with: decisions left in quarantine are never silent.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moderation.storage.spool import QUARANTINE, SUFFIX
from moderation.storage.spool_format import SpoolRecordError, scan


@dataclass(frozen=True)
class SpoolCount:
    """Spool files in one folder, the decisions they hold and their records that cannot be read."""

    folder: str
    files: int = 0
    decisions: int = 0
    unreadable: int = 0

    @property
    def empty(self) -> bool:
        return self.files == 0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """`3 decisions in 1 file` (and unreadable records, when there are)."""
        text = f"{self.decisions} decisions in {self.files} file(s)"
        if self.unreadable:
            text += f" and {self.unreadable} unreadable record(s)"
        return text


def count_folder(folder: Path | str) -> SpoolCount:
    """The spool files directly in `folder` (not in its quarantine) and what they hold."""
    folder = Path(folder)
    files = decisions = unreadable = 0
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(SUFFIX))
    except (FileNotFoundError, NotADirectoryError):
        names = []
    for name in names:
        try:
            fd = os.open(folder / name, os.O_RDONLY)
        except FileNotFoundError:
            continue  # replayed meanwhile
        try:
            held, bad = _decisions_in(fd)
        finally:
            os.close(fd)
        if held or bad:
            files += 1
            decisions += held
            unreadable += bad
    return SpoolCount(str(folder), files, decisions, unreadable)


def count_quarantine(spool_folder: Path | str) -> SpoolCount:
    """What replays set aside in `spool_folder`/quarantine."""
    return count_folder(Path(spool_folder) / QUARANTINE)


def _decisions_in(fd: int) -> tuple[int, int]:
    decisions = unreadable = 0
    for record in scan(fd):
        if record.kind != "decisions":
            continue
        try:
            rows = record.payload().get("rows")
        except SpoolRecordError:
            rows = None
        if isinstance(rows, list):
            decisions += len(rows)
        else:
            unreadable += 1
    return decisions, unreadable
