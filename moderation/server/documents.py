"""The decision documents the service returns, in one place.

`live_document` is `check --json`'s per-image object (decision id, verdict, action, fired,
concepts, special care, margin, recorded, shadow decisions) without the file fields;
`logged_document` is `decisions show --json`'s document. Both come from the builders those
commands use, so the service and the CLI never disagree. `check --json`'s row builder lives in
the CLI, which the server must not import (the CLI imports the server: no cycles), so the CLI
hands it over with `use_row_builder` when it starts the service (`moderation serve`, and the
tests' server factory). When the project has one decision-document builder outside the CLI,
this module calls it directly and `use_row_builder` goes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moderation.decision import Decision

RowBuilder = Callable[[Decision, bool, int], dict[str, Any]]
_row_builder: RowBuilder | None = None


def use_row_builder(builder: RowBuilder) -> None:
    """Install the builder of `check --json` rows: (decision, recorded, top) -> dict."""
    global _row_builder
    _row_builder = builder


def live_document(decision: Decision, recorded: bool, top: int | None = 5) -> dict[str, Any]:
    """The `check --json` object of a decision just made (`top` concepts; 0 or None: all)."""
    if _row_builder is None:
        raise RuntimeError("no decision document builder: call use_row_builder() first")
    return _row_builder(decision, recorded, top or 0)


def logged_document(db: Any, decision_id: str) -> dict[str, Any]:
    """The `decisions show --json` document of a logged decision (full id or unique prefix).

    db: a DecisionBrowser (or a database URL for one). Raises DecisionError when unknown."""
    from moderation.review.decisions import DecisionBrowser

    browser = db if isinstance(db, DecisionBrowser) else DecisionBrowser(db)
    return browser.show(decision_id)
