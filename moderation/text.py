"""Text that reaches a terminal or a spreadsheet: the one escaping rule of every output.

Names, reasons, prompts, concept and file names come from users: a control character in them
could clear the screen, set the window title or forge a line, and a CSV cell that starts like a
formula runs in a spreadsheet. Standalone (imports nothing), so that the CLI and the review
reports share it.
"""

from __future__ import annotations

import re
from typing import Any

# C0, DEL, C1, line/paragraph separators and the bidirectional overrides that reorder a line.
_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_BEYOND_C0 = f"\x7f-\x9f\u2028\u2029{_BIDI}"
CONTROL = re.compile(f"[\x00-\x1f{_BEYOND_C0}]")
BEYOND_C0 = re.compile(f"[{_BEYOND_C0}]")  # what JSON text leaves unescaped of CONTROL
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# What a spreadsheet reads as the start of a formula (OWASP: =, +, -, @, tab, carriage return).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape_controls(value: Any) -> str:
    """Text on one harmless line: control characters written as `\\x1b`, `\\n`, `\\u202e`."""
    text = "" if value is None else str(value)
    return CONTROL.sub(_escape, text)


def spreadsheet_cell(text: str) -> str:
    """A CSV cell that no spreadsheet runs: a leading `'` before a formula start, and control
    characters escaped."""
    if text.startswith(FORMULA_START):
        text = "'" + text
    return escape_controls(text)
