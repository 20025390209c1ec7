"""PolicyError: every problem in a policy file, each at FILE:LINE:COL with its key path."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import NamedTuple

KeyPath = tuple[str | int, ...]  # ("concepts", 2, "threshold")

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


def format_path(path: KeyPath) -> str:
    """Render a key path as `concepts[2].threshold` (`<root>` for the document itself)."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part)}]"
    return text or "<root>"


def _printable(text: str) -> str:
    """Escape control characters so that one issue stays one harmless terminal line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class PolicyIssue(NamedTuple):
    """One problem: where it is (line and col are 1-based, None when unknown) and what is wrong."""

    file: str
    line: int | None
    col: int | None
    path: str
    message: str

    def __str__(self) -> str:
        if self.line is None:
            return _printable(f"{self.file}: {self.message}")
        return _printable(f"{self.file}:{self.line}:{self.col} {self.path}: {self.message}")


class PolicyError(Exception):
    """A policy could not be loaded; `issues` lists every problem found, in file order."""

    def __init__(self, issues: Iterable[PolicyIssue]) -> None:
        self.issues = list(issues)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)

    @classmethod
    def about_file(cls, file: str, message: str) -> PolicyError:
        """An error about the file as a whole (missing, unreadable), without a position."""
        return cls([PolicyIssue(file, None, None, "", message)])


def kind_of(value: object) -> str:
    """The YAML-level name of a value's type, for messages like `expected a number, got string`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__
