"""Filters that name nothing: a concept or policy that no logged policy has is a mistake to name
("no concept 'nudty' in the log; did you mean 'nudity'?"), not an empty answer."""

from __future__ import annotations

import difflib

from sqlalchemy import select
from sqlalchemy.engine import Engine

from moderation.storage.models import PolicyRow


def _names(engine: Engine) -> tuple[set[str], set[str], list[str]]:
    """(policy names, concept names incl. special care, digests) of every logged policy."""
    policies, concepts, digests = set(), set(), []
    query = select(PolicyRow.name, PolicyRow.digest, PolicyRow.concepts, PolicyRow.special_concepts)
    with engine.connect() as conn:
        for name, digest, regular, special in conn.execute(query):
            policies.add(name)
            digests.append(digest)
            for entry in [*(regular or []), *(special or [])]:
                concepts.add(entry["name"] if isinstance(entry, dict) else str(entry))
    return policies, concepts, digests


def _hint(value: str, known: set[str]) -> str:
    close = difflib.get_close_matches(value, sorted(known), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    if known:
        shown = sorted(known)
        more = f", ... ({len(shown)} in all)" if len(shown) > 12 else ""
        return f"; the log has: {', '.join(shown[:12])}{more}"
    return "; the log holds no policy yet"


def unknown_filter(engine: Engine, *, concept: str | None = None, policy: str | None = None):
    """Why a concept or policy filter can match nothing (no logged policy has it), else None.

    A policy filter matches a logged policy's name or a prefix of its digest.
    """
    if concept is None and policy is None:
        return None
    policies, concepts, digests = _names(engine)
    if policy is not None and policy not in policies:
        if not any(d.startswith(policy.lower()) for d in digests):
            return (
                f"no policy {policy!r} (name or digest prefix) in the log{_hint(policy, policies)}"
            )
    if concept is not None and concept not in concepts:
        return f"no concept {concept!r} in any logged policy{_hint(concept, concepts)}"
    return None
