"""Review labels: which of its policy's concepts a reviewer says an image really shows.

A verdict records labels in `review_items.labels` (and in its audit event):

    {"shows": [names], "missed": [names], "false_alarms": [names], "explicit": bool}

`shows` lists every concept of the decision's policy (regular and special-care) that the image
shows, in policy order; every other concept of that policy is one it does not show (the
reviewer saw the whole image and every concept's score). `missed` are shown concepts that did
not fire, `false_alarms` fired ones that are not shown; `explicit` says whether the reviewer
named the concepts (`--concept`, `--no-concepts`) or the verdict's default applied:

- reject: the concepts that fired and the special-care hits; when nothing fired (the review
  band sent the image), the concepts whose score was within the band;
- approve: the fired concepts were false alarms; special-care hits stay shown, because an
  approval says the image is acceptable, not that no child (say) is in it. Name the concepts to
  say otherwise.

A verdict given before labels existed (NULL) counts with its verdict's default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import Connection, select

from moderation.review.rules import ReviewError
from moderation.storage.models import DecisionRow, PolicyRow
from policy.vocabulary import DECIDED

LISTED = 20  # knob: how many of a policy's concept names an error message lists


def _shown(name: str) -> str:
    """A name safe for one terminal line (control characters escaped)."""
    return name if name.isprintable() else repr(name)[1:-1]


def policy_names(policy: Any) -> tuple[list[str], list[str]]:
    """(concept names, special-care names) of a `policies` row."""
    concepts = [c.get("name") for c in policy.concepts or []]
    special = [c.get("name") for c in policy.special_concepts or []]
    return concepts, special


def near_misses(policy: Any, decision: Any) -> list[str]:
    """Concepts that did not fire but scored within the policy's review band."""
    band = float(policy.review_band or 0.0)
    scores = np.frombuffer(decision.scores or b"", dtype="<f4")
    names = policy_names(policy)[0]
    if band <= 0 or scores.size != len(names):
        return []
    return [names[i] for i in np.flatnonzero((scores > -band) & (scores <= 0)).tolist()]


def default_shows(status: str, policy: Any, decision: Any) -> list[str]:
    """What a verdict says the image shows when the reviewer names nothing."""
    fired, hits = list(decision.fired or []), list(decision.special_hits or [])
    if status == "approved":
        return hits
    return (fired or near_misses(policy, decision)) + hits


def make_labels(
    item_id: int, status: str, concepts: Sequence[str] | None, policy: Any, decision: Any
) -> dict[str, Any]:
    """The labels a verdict records; ReviewError for a name that is not one of the policy's."""
    names, special = policy_names(policy)
    known = names + special
    if concepts is None:
        shows = set(default_shows(status, policy, decision))
    else:
        shows = set()
        for raw in concepts:
            if not isinstance(raw, str):
                raise ReviewError(f"item {item_id}: a concept name must be text, not {raw!r}")
            name = raw.strip()
            if name not in known:
                listed = ", ".join(_shown(n) for n in names[:LISTED])
                if len(names) > LISTED:
                    listed += f" and {len(names) - LISTED} more"
                if special:
                    listed += "; special care: " + ", ".join(_shown(n) for n in special[:LISTED])
                raise ReviewError(
                    f"item {item_id}: unknown concept '{_shown(name)}'; policy "
                    f"{_shown(policy.name)} has: {listed or 'no concepts'}"
                )
            shows.add(name)
    fired = set(decision.fired or []) | set(decision.special_hits or [])
    ordered = [n for n in known if n in shows]
    return {
        "shows": ordered,
        "missed": [n for n in ordered if n not in fired],
        "false_alarms": [n for n in known if n in fired and n not in shows],
        "explicit": concepts is not None,
    }


def verdict_labels(
    conn: Connection, item: Any, status: str, concepts: Sequence[str] | None
) -> dict[str, Any]:
    """The labels of a verdict on review item `item` (a review_items row)."""
    decision, policy = decision_and_policy(conn, item.decision_id)
    return make_labels(item.id, status, concepts, policy, decision)


def decision_and_policy(conn: Connection, decision_id: str) -> tuple[Any, Any]:
    """The fields of a decision and its policy that labels are made from."""
    row = conn.execute(
        select(
            DecisionRow.fired,
            DecisionRow.special_hits,
            DecisionRow.scores,
            PolicyRow.name,
            PolicyRow.concepts,
            PolicyRow.special_concepts,
            PolicyRow.review_band,
        )
        .join(PolicyRow, DecisionRow.policy_digest == PolicyRow.digest)
        .where(DecisionRow.id == decision_id)
    ).one()
    return row, row


def item_labels(status: str, stored: Any, policy: Any, decision: Any) -> dict[str, Any] | None:
    """The labels a decided item stands for: as recorded, or (for a verdict recorded before
    labels existed) its verdict's default; None while the item awaits a verdict."""
    if status not in DECIDED:
        return None
    if stored is not None:
        return dict(stored)
    labels = make_labels(0, status, None, policy, decision)
    labels["inferred"] = True  # not recorded by the verdict: its default, worked out now
    return labels


def render(labels: dict[str, Any] | None) -> str:
    """One line for people: `shows gore; missed -; false alarms violence (named by the reviewer)`."""
    if labels is None:
        return "-"

    def names(key: str) -> str:
        return ", ".join(_shown(n) for n in labels.get(key) or []) or "-"

    how = "named by the reviewer" if labels.get("explicit") else "the verdict's default"
    return (
        f"shows {names('shows')}; missed {names('missed')}; "
        f"false alarms {names('false_alarms')} ({how})"
    )
