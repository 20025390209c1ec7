"""`policy diff`: what changed between two policies, and whether they can decide differently.

Pure functions over loaded policies. Each policy, a YAML `Policy` (flattened: `extends:` already
merged by the loader) with its `CompiledPolicy` when it could be compiled, or a compiled
artifact alone, becomes a `PolicySide`: its settings and, per concept, what can be compared. Two
sides then give one `diff` result (the JSON of `moderation policy diff --json`).

What can change a decision (and makes two policies differ): the concept set and names (a
decision records which concepts fired), each concept's threshold, action, kind (regular or
special care) and definition (its vector; without one, its prompts, embedding values, example
images or checkpoint row), the relative order of concepts (which concept is `top_concept` when
scores tie, as they do under `compat: diffusers`' 3-decimal rounding, and that compat's
special-care loop), and the settings in `DECISIVE`. Names, versions, categories, severities,
defaults and declared categories are reported but change no decision: `decide()` and the review
queue use neither category nor severity, and defaults act only through each concept's effective
threshold, action and severity, which are compared per concept.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moderation.lifecycle.diff_sides import ConceptSide, PolicySide

# Two concepts with this cosine or more between their vectors are "the same definition".
RENAME_COSINE = 0.999
# Settings that change what a decision is or what its action does to the image.
DECISIVE = (
    "model",
    "compat",
    "views",
    "review_band",
    "on_error",
    "special_care.adjustment",
    "special_care.escalate",
    "actions.blur.radius",
    "actions.pixelate.block",
    "actions.review.placeholder",
)
# Settings reported when they differ that no decision depends on (YAML policies only: a compiled
# artifact keeps no defaults, declared categories or description).
DESCRIPTIVE = (
    "name",
    "version",
    "description",
    "defaults.threshold",
    "defaults.action",
    "defaults.severity",
    "categories",
)
CONCEPT_FIELDS = ("special_care", "threshold", "action", "definition", "category", "severity")
DECISIVE_CONCEPT_FIELDS = frozenset({"special_care", "threshold", "action", "definition"})


# -- comparison -------------------------------------------------------------------------------


def _entry(old: Any, new: Any, decisive: bool, **extra: Any) -> dict[str, Any]:
    return {"old": old, "new": new, **extra, "affects_decisions": decisive}


def cosine(a: ConceptSide, b: ConceptSide) -> float | None:
    """The cosine between two concepts' unit vectors (None without both, or at two widths)."""
    if a.vector is None or b.vector is None or a.vector.shape != b.vector.shape:
        return None
    return float(np.dot(a.vector.astype(np.float64), b.vector.astype(np.float64)))


def same_definition(a: ConceptSide, b: ConceptSide) -> bool | None:
    """Whether two concepts have one vector: bit for bit when both have one, else by what
    defines them (same prompts, embedding values, example images, checkpoint row); None when
    that cannot be told (a prompt concept without a model against a compiled vector)."""
    if a.vector is not None and b.vector is not None:
        return a.vector.shape == b.vector.shape and a.vector.tobytes() == b.vector.tobytes()
    if a.key is not None and b.key is not None:
        return a.key == b.key
    return None


def _without_vector(source: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in source.items() if k != "vector"}


def definition_change(a: ConceptSide, b: ConceptSide) -> dict[str, Any] | None:
    """The `definition` entry of a concept in both policies, or None when nothing changed.

    A new source for the same vector (prompts reworded to the same embedding, inline values
    moved to a file) is reported as changing no decision; the cosine is given whenever both
    vectors are known (a model was given, or both are compiled).
    """
    same = same_definition(a, b)
    described = _without_vector(a.source), _without_vector(b.source)
    reworded = all(described) and described[0] != described[1]
    if same and not reworded:
        return None
    extra: dict[str, Any] = {"cosine": cosine(a, b)}
    if same is None:
        extra["compared"] = False  # fail closed: counted as a change
    return _entry(a.source, b.source, same is not True, **extra)


def concept_changes(a: ConceptSide, b: ConceptSide) -> dict[str, dict[str, Any]]:
    """{field: {old, new, affects_decisions}} for every field of a concept that differs."""
    changes: dict[str, dict[str, Any]] = {}
    values = {
        "special_care": (a.special, b.special),
        "threshold": (a.threshold, b.threshold),
        "action": (a.action, b.action),
        "category": (a.category, b.category),
        "severity": (a.severity, b.severity),
    }
    for name in CONCEPT_FIELDS:
        if name == "definition":
            entry = definition_change(a, b)
            if entry is not None:
                changes[name] = entry
        elif values[name][0] != values[name][1]:
            changes[name] = _entry(*values[name], name in DECISIVE_CONCEPT_FIELDS)
    if isinstance(a.threshold, dict) != isinstance(b.threshold, dict):
        changes["threshold"]["compared"] = False  # a checkpoint row that was not read
    return changes


def _vector_candidates(
    removed: list[ConceptSide], added: list[ConceptSide], chunk: int = 1024
) -> list[tuple[float, int, int]]:
    """(-cosine, i, j) for every removed i and added j of one width at RENAME_COSINE or more:
    one matrix product per chunk of removed concepts, never a Python loop over the pairs."""
    found = []
    widths = {c.vector.shape for c in removed + added if c.vector is not None}
    for width in widths:
        old = [i for i, c in enumerate(removed) if c.vector is not None and c.vector.shape == width]
        new = [j for j, c in enumerate(added) if c.vector is not None and c.vector.shape == width]
        if not old or not new:
            continue
        right = np.stack([added[j].vector for j in new]).astype(np.float64)  # [A, D]
        for start in range(0, len(old), chunk):
            rows = old[start : start + chunk]
            left = np.stack([removed[i].vector for i in rows]).astype(np.float64)  # [R, D]
            cosines = left @ right.T  # [R, A]
            for r, a in zip(*np.nonzero(cosines >= RENAME_COSINE), strict=True):
                found.append((-float(cosines[r, a]), rows[r], new[a]))
    return found


def match_renames(
    removed: list[ConceptSide], added: list[ConceptSide]
) -> list[tuple[ConceptSide, ConceptSide]]:
    """Pairs (removed, added) that look like one concept renamed: a cosine of at least
    RENAME_COSINE between their vectors, or (without both vectors) the same definition; closest
    pairs first, each concept in one pair at most."""
    candidates = _vector_candidates(removed, added)
    by_key: dict[tuple, list[int]] = {}
    for j, concept in enumerate(added):
        if concept.key is not None:
            by_key.setdefault(concept.key, []).append(j)
    for i, concept in enumerate(removed):
        for j in by_key.get(concept.key, []) if concept.key is not None else []:
            if concept.vector is None or added[j].vector is None:
                candidates.append((-1.0, i, j))
    pairs, used_old, used_new = [], set(), set()
    for _, i, j in sorted(candidates):
        if i not in used_old and j not in used_new:
            used_old.add(i)
            used_new.add(j)
            pairs.append((removed[i], added[j]))
    return pairs


def _order(side: PolicySide, special: bool, common: set[str]) -> list[str]:
    return [c.name for c in side.concepts if c.special == special and c.name in common]


def setting_changes(old: PolicySide, new: PolicySide) -> dict[str, dict[str, Any]]:
    """{setting: {old, new, affects_decisions}} for every setting that differs, the relative
    order of the concepts in both included (`concept_order`, `special_care.concept_order`)."""
    changes: dict[str, dict[str, Any]] = {}
    for key in DECISIVE:
        a, b = old.settings[key], new.settings[key]
        if (old.model_key != new.model_key) if key == "model" else a != b:
            changes[key] = _entry(a, b, True)
    common = {c.name for c in old.concepts} & {c.name for c in new.concepts}
    for special, key in ((False, "concept_order"), (True, "special_care.concept_order")):
        a, b = _order(old, special, common), _order(new, special, common)
        if a != b:
            changes[key] = _entry(a, b, True)
    for key in DESCRIPTIVE:
        if key in old.settings and key in new.settings:
            a, b = old.settings[key], new.settings[key]
            if a != b:
                changes[key] = _entry(a, b, False)
    return changes


def _decisive(changes: dict[str, dict[str, Any]]) -> bool:
    return any(entry["affects_decisions"] for entry in changes.values())


def diff(old: PolicySide, new: PolicySide) -> dict[str, Any]:
    """Everything that differs between two policies, as the JSON `policy diff --json` prints.

    `identical` is True when they decide identically: no concept added, removed or renamed and
    no change that affects decisions (every change is still listed, with `affects_decisions`).
    """
    new_names = {c.name for c in new.concepts}
    old_by_name = {c.name: c for c in old.concepts}
    removed = [c for c in old.concepts if c.name not in new_names]
    added = [c for c in new.concepts if c.name not in old_by_name]
    renamed = match_renames(removed, added)
    gone = {id(a) for a, _ in renamed} | {id(b) for _, b in renamed}
    changed, not_compared = {}, []
    for concept in new.concepts:
        before = old_by_name.get(concept.name)
        if before is None:
            continue
        changes = concept_changes(before, concept)
        if changes:
            changed[concept.name] = changes
        if any(entry.get("compared") is False for entry in changes.values()):
            not_compared.append(concept.name)
    settings = setting_changes(old, new)
    renames = [
        {"old": a.name, "new": b.name, "cosine": cosine(a, b), "changes": concept_changes(a, b)}
        for a, b in renamed
    ]
    return {
        "identical": not (
            removed or added or any(_decisive(c) for c in changed.values()) or _decisive(settings)
        ),
        "old": old.identity(),
        "new": new.identity(),
        "concepts": {
            "added": [c.name for c in added if id(c) not in gone],
            "removed": [c.name for c in removed if id(c) not in gone],
            "renamed": renames,
            "changed": changed,
        },
        "settings": settings,
        "not_compared": not_compared,
    }
