"""The decision documents the service returns, in one place.

`live_document` is `check --json`'s per-image object (decision id, verdict, action, fired,
concepts, special care, margin, recorded, shadow decisions) without the file fields;
`logged_document` is `decisions show --json`'s document. Both call the builders those commands
use, so the service and the CLI never disagree; when the project grows one decision-document
builder, this adapter is the only place that changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moderation.decision import Decision

_FILE_KEYS = ("file", "checked", "out", "also_given_as")


def live_document(decision: Decision, recorded: bool, top: int | None = 5) -> dict[str, Any]:
    """The `check --json` object of a decision just made (`top` concepts; 0 or None: all)."""
    from moderation.cli.check_cmd import _json_row
    from moderation.cli.check_inputs import ImageInput

    item = ImageInput(path=Path("-"), name=Path("-"))
    row = _json_row(item, {id(item): decision}, top or 0, None, lambda d: recorded)
    return {k: v for k, v in row.items() if k not in _FILE_KEYS}


def logged_document(db: Any, decision_id: str) -> dict[str, Any]:
    """The `decisions show --json` document of a logged decision (full id or unique prefix).

    db: a DecisionBrowser (or a database URL for one). Raises DecisionError when unknown."""
    from moderation.review.decisions import DecisionBrowser

    browser = db if isinstance(db, DecisionBrowser) else DecisionBrowser(db)
    return browser.show(decision_id)
