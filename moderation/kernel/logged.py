"""A logged decision's document: its `decisions` and `policies` rows read, with its shadows."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from moderation.kernel import rule
from moderation.kernel.document import document, floats, row_facts, shadow_summary
from policy.vocabulary import ACTIONS


def held_file(held_path: str | None) -> str | None:
    """The held original's full path: as the decision log recorded it; an older, relative path
    under $MODERATION_HELD_DIR (else ./held)."""
    from moderation.storage.held import HeldStore
    from moderation.storage.log import default_held_dir

    if held_path is None:
        return None
    return str(HeldStore(default_held_dir()).path_of(held_path).absolute())


def logged_rows(conn: Any, decision_id: str) -> tuple[Any, Any] | None:
    """The `decisions` row of `decision_id` and its `policies` row (None: no such decision).
    `conn`: a SQLAlchemy Connection or Session."""
    from sqlalchemy import select

    from moderation.storage.models import DecisionRow, PolicyRow

    decision = conn.execute(
        select(DecisionRow.__table__).where(DecisionRow.id == decision_id)
    ).first()
    if decision is None:
        return None
    policy = conn.execute(
        select(PolicyRow.__table__).where(PolicyRow.digest == decision.policy_digest)
    ).one()
    return decision, policy


def logged_shadows(conn: Any, decision_id: str) -> list[dict[str, Any]]:
    """The shadow decisions of a live decision, as `shadow_summary`s (candidate order: policy
    name, version, id)."""
    from sqlalchemy import select

    from moderation.storage.models import DecisionRow, PolicyRow

    d, p = DecisionRow.__table__, PolicyRow.__table__
    rows = conn.execute(
        select(d, *(c.label(f"pol_{c.name}") for c in p.columns))
        .join(p, d.c.policy_digest == p.c.digest)
        .where(d.c.shadow_of == decision_id)
        .order_by(p.c.name, p.c.version, d.c.id)
    ).all()
    out = []
    for row in rows:
        policy = Prefixed(row, "pol_")
        out.append(shadow_summary(row_facts(row, policy)))
    return out


class Prefixed:
    """The `policy_*` columns of a joined row as a policies row."""

    def __init__(self, row: Any, prefix: str) -> None:
        self._row, self._prefix = row, prefix

    def __getattr__(self, name: str) -> Any:
        return getattr(self._row, self._prefix + name)


def logged_document(
    conn: Any,
    decision_id: str,
    *,
    top: int | None = None,
    review: Any = None,
) -> dict[str, Any] | None:
    """The document of a logged decision (its full id; None when there is none). `review`:
    a callable (conn, decision row, policy row) -> (review, labels) that adds the review."""
    rows = logged_rows(conn, decision_id)
    if rows is None:
        return None
    decision, policy = rows
    facts = row_facts(decision, policy, held_file=held_file(decision.held_path))
    found, labels = review(conn, decision, policy) if review is not None else (None, None)
    shadows = logged_shadows(conn, decision.id)
    return document(facts, top=top, review=found, labels=labels, shadows=shadows)


def review_band_concepts(policy: Any, decision: Any) -> list[str]:
    """The concepts of a logged decision (a row with `scores`) that did not fire but scored
    within its policy's (a `policies` row) review band, in policy order: the one rule's."""
    concepts = policy.concepts or []
    scores = floats(decision.scores)
    band = float(policy.review_band or 0.0)
    if band <= 0 or scores.size != len(concepts):
        return []
    actions = [c.get("action") for c in concepts]
    if not all(a in ACTIONS for a in actions):
        return []
    rules = rule.Rules.logged(actions, 0, None, band)
    outcome = rule.apply(rules, torch.from_numpy(scores.copy()[None, :]), torch.zeros(1, 0))
    return [concepts[i].get("name") for i in np.flatnonzero(outcome.in_band[0].numpy()).tolist()]
