"""A policy's text, written to another folder: its relative `model:` folder follows it.

A relative `model:` folder is read from the policy file's folder, so a copy written elsewhere
(`policy calibrate --out OTHER/new.yaml`) would name a folder that is not there. The copy's
`model:` line is rewritten to reach the same folder from the new one; nothing else changes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# A top-level `model:` line: its value (maybe quoted) and whatever follows it (a comment).
_MODEL_LINE = re.compile(
    r"^(?P<key>model:[ \t]*)(?P<quote>[\"']?)(?P<value>[^\"'#\s][^\"'#]*?)(?P=quote)"
    r"(?P<rest>[ \t]*(?:#.*)?)$",
    re.MULTILINE,
)


def relocate_model(text: str, source: Path, out: Path) -> str:
    """`text` (the policy read from `source`) with its relative model folder made relative to
    `out`'s folder; unchanged when the model is a hub id, absolute, or the folder is the same."""
    match = _MODEL_LINE.search(text)
    if match is None:
        return text
    value = match["value"].strip()
    if Path(value).expanduser().is_absolute():
        return text
    folder = source.parent / value
    if not folder.is_dir():
        return text  # a hub id (or a folder that is not there: validation says so)
    if source.parent.resolve() == out.parent.resolve():
        return text
    moved = Path(os.path.relpath(folder.resolve(), out.parent.resolve())).as_posix()
    line = f"{match['key']}{match['quote']}{moved}{match['quote']}{match['rest']}"
    return text[: match.start()] + line + text[match.end() :]
