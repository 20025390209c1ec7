"""The decision documents the service returns: the one decision document
(moderation.decisions.document; docs/decision-document.md), so that the service, the CLI and the
review desk never disagree.

`live_document` is the document of a decision just made (what `check --json` prints per image,
without its file fields); `logged_document` is `decisions show --json`'s document.
"""

from __future__ import annotations

from typing import Any

from moderation.decision import Decision
from moderation.decisions.browser import DecisionBrowser
from moderation.decisions.document import decision_document


def live_document(decision: Decision, recorded: bool, top: int | None = 5) -> dict[str, Any]:
    """The document of a decision just made, with its `top` nearest concepts (0 or None: all)."""
    return decision_document(decision, recorded=recorded, top=top or None)


def logged_document(db: Any, decision_id: str) -> dict[str, Any]:
    """The `decisions show --json` document of a logged decision (full id, or 8+ of its first
    or last characters). db: a DecisionBrowser, or a database URL for one. Raises DecisionError
    when unknown."""
    browser = db if isinstance(db, DecisionBrowser) else DecisionBrowser(db)
    return browser.show(decision_id)
