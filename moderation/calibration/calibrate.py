"""calibrate: how each concept's threshold does on labelled images, and the threshold that meets a
target with the best recall.

Labelled images (moderation.calibration.samples) are scored with `moderation.scoring.score`,
exactly as the engine scores: each concept's cosine is its maximum over an image's views, plus
the special-care adjustment where a special-care concept fired. A concept fires where
`cosine - threshold + adjustment > 0`, so for one concept (every other threshold as it is) an
image's *value* `cosine + adjustment` fires exactly when it is above the threshold; the search
runs over those values, and the suggested threshold's counts are then scored again through
`score` with the new threshold, so they are what the engine would do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moderation.calibration.labelset import LabelledSet
from moderation.calibration.metrics import Confusion, Target, best_cut, short_threshold
from moderation.calibration.samples import (
    CalibrationError,
    from_folders,
    from_log,
)
from moderation.scoring import score
from moderation.storage.db import require_database
from moderation.tables import plural
from policy.compiled import CompiledPolicy
from policy.schema import Policy

SCORE_CHUNK = 2048  # knob: images scored per call (bounds the [N, C] intermediates)


@dataclass
class ConceptCalibration:
    """One concept's labelled values and what its current and suggested thresholds do."""

    name: str
    special: bool
    index: int  # row in the compiled policy's (special-care) matrix
    values: np.ndarray  # [n] float64: cosine + adjustment of each labelled image
    positive: np.ndarray  # [n] bool: the image shows the concept
    threshold: float
    current: Confusion
    conflicts: int = 0
    excluded: int = 0
    suggested_threshold: float | None = None
    suggested: Confusion | None = None
    refused: str | None = None
    labelled: np.ndarray | None = field(default=None, repr=False)  # [N] bool: which images

    @property
    def changed(self) -> bool:
        return self.suggested_threshold is not None and self.suggested_threshold != self.threshold

    def to_dict(self) -> dict[str, Any]:
        suggested = None
        if self.suggested is not None and self.suggested_threshold is not None:
            suggested = {
                **self.suggested.to_dict(self.suggested_threshold),
                "changed": self.changed,
            }
        return {
            "special_care": self.special,
            "positives": int(self.positive.sum()),
            "negatives": int((~self.positive).sum()),
            "conflicts": self.conflicts,
            "excluded_examples": self.excluded,
            "current": self.current.to_dict(self.threshold),
            "suggested": suggested,
            "refused": self.refused,
        }


@dataclass
class Calibration:
    """The whole report: the policy, the labels it saw, and one entry per concept."""

    policy: CompiledPolicy
    source: Path
    target: Target
    min_examples: int
    labels: LabelledSet
    concepts: list[ConceptCalibration] = field(default_factory=list)
    # The exact text of a YAML policy that was compiled and scored: `--out` rewrites this text,
    # never the file as it is later (an edit made meanwhile is refused, not merged).
    source_text: str | None = None

    def thresholds(self) -> dict[str, float]:
        """{concept: new threshold} of every concept whose suggestion changes its threshold."""
        return {c.name: c.suggested_threshold for c in self.concepts if c.changed}

    def to_dict(self) -> dict[str, Any]:
        target = (
            {"max_false_positive_rate": self.target.max_fpr}
            if self.target.max_fpr is not None
            else {"precision": self.target.precision}
        )
        labels = self.labels
        return {
            "policy": {
                "name": self.policy.name,
                "version": self.policy.version,
                "digest": self.policy.digest,
                "file": str(self.source),
            },
            "target": target,
            "min_examples": self.min_examples,
            "labels": {
                "decisions": labels.decisions,
                "images": labels.images,
                "distinct_images": len(labels.samples),
                "skipped": dict(sorted(labels.skipped.items())),
            },
            "concepts": {c.name: c.to_dict() for c in self.concepts},
        }


def plain(value: float) -> float:
    """A float32 threshold as the short number it was written as (0.3, not 0.30000001)."""
    return float(f"{float(value):.6g}")


def calibrate(
    policy_path: str | Path,
    *,
    db: str | None = None,
    use_log: bool = True,
    positives: Sequence[tuple[str, Path]] = (),
    negatives: Sequence[Path] = (),
    target: Target | None = None,
    min_examples: int = 20,
    model: str | None = None,
    device: str | None = None,
    cache: Any = None,
    progress: bool = False,
) -> Calibration:
    """Calibrate every concept of a policy (YAML or compiled artifact) on labelled images."""
    from moderation.calibration.cache import ImageEmbeddingCache
    from moderation.loading import load_any_policy, load_compiled
    from moderation.storage.db import resolve_db_url

    path = Path(policy_path)
    loaded = load_any_policy(path)
    if isinstance(loaded, Policy):
        name, names = loaded.policy, [c.name for _, c in loaded.iter_concepts()]
    else:
        name, names = loaded.name, [*loaded.concept_names, *loaded.special_names]
    for concept, _ in positives:  # checked before the model loads: a typo fails at once
        if concept not in names:
            raise CalibrationError(
                f"--positive {concept}=...: policy {name} has no concept '{concept}' "
                f"(it has: {', '.join(names)})"
            )
    url = resolve_db_url(db)
    if use_log:
        require_database(url)
    # An artifact is loaded by path, so that a model folder beside it is found.
    source = loaded if isinstance(loaded, Policy) else path
    compiled, encoder = load_compiled(source, model=model, device=device)
    labels = LabelledSet()
    if use_log:
        from_log(url, compiled, labels)
    everything = frozenset(names)
    folders = [(Path(d), frozenset({c}), frozenset({c})) for c, d in positives]
    folders += [(Path(d), everything, frozenset()) for d in negatives]
    if folders:
        cache = cache if cache is not None else ImageEmbeddingCache()
        from_folders(folders, compiled, encoder, labels, cache=cache, progress=progress)
    excluded = _exclude_examples(loaded, compiled, labels)
    report = Calibration(compiled, path, target or Target(precision=0.9), min_examples, labels)
    report.source_text = loaded.source_text if isinstance(loaded, Policy) else None
    _calibrate_concepts(report, excluded)
    return report


def _exclude_examples(loaded: Any, compiled: CompiledPolicy, labels: LabelledSet) -> dict:
    """Example images define their concept: never count them as its test data."""
    from moderation.image_files import ImageInputError
    from moderation.images import image_sha256, load_image_file

    files: dict[str, set[str]] = {}
    for entry in compiled.example_sha256:
        concept, _, digest = entry.rpartition(":")
        files.setdefault(concept, set()).add(digest)
    pixels: dict[str, set[str]] = {}
    for _, concept in loaded.iter_concepts() if isinstance(loaded, Policy) else ():
        for _, file in concept.example_files or ():
            try:
                pixels.setdefault(concept.name, set()).add(image_sha256(load_image_file(file)))
            except ImageInputError:
                pass  # it compiled, so it reads; a file changed since is matched by its bytes
    return {
        name: labels.exclude(name, pixels.get(name, set()), files.get(name, set()))
        for name in set(files) | set(pixels)
    }


def _score_all(policy: CompiledPolicy, embeddings: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Scores of every image ([V, D] views each), in chunks, as numpy arrays."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(embeddings), SCORE_CHUNK):
        chunk = embeddings[start : start + SCORE_CHUNK]
        rows = torch.from_numpy(np.concatenate(chunk).astype(np.float32))  # [N, D]
        owners = torch.repeat_interleave(torch.tensor([len(e) for e in chunk]))  # [N]
        s = score(policy, rows.to(policy.device), owners.to(policy.device), len(chunk))
        for name in (
            "cosines",
            "scores",
            "special_cosines",
            "special_scores",
            "adjustment",
            "valid",
        ):
            parts.setdefault(name, []).append(getattr(s, name).cpu().numpy())
    empty = {
        "cosines": np.zeros((0, len(policy.concept_names)), np.float32),
        "scores": np.zeros((0, len(policy.concept_names)), np.float32),
        "special_cosines": np.zeros((0, len(policy.special_names)), np.float32),
        "special_scores": np.zeros((0, len(policy.special_names)), np.float32),
        "adjustment": np.zeros(0, np.float32),
        "valid": np.zeros(0, bool),
    }
    return {k: np.concatenate(v) for k, v in parts.items()} if parts else empty


def _calibrate_concepts(report: Calibration, excluded: dict[str, int]) -> None:
    policy = report.policy
    samples = list(report.labels.samples.values())
    scored = _score_all(policy, [s.embedding for s in samples])
    report.labels.skipped["unscorable"] += int((~scored["valid"]).sum())
    if not report.labels.skipped["unscorable"]:
        del report.labels.skipped["unscorable"]
    valid = scored["valid"]
    thresholds = policy.thresholds.cpu().numpy()
    special_thresholds = policy.special_thresholds.cpu().numpy()
    columns = [(n, False, i) for i, n in enumerate(policy.concept_names)]
    columns += [(n, True, k) for k, n in enumerate(policy.special_names)]
    labels = report.labels.columns([name for name, _, _ in columns])  # [N] int8 each
    for (name, special, index), label in zip(columns, labels, strict=True):
        has = (label >= 0) & valid  # [N]
        positive = label[has] == 1
        if special:
            values = scored["special_cosines"][has, index].astype(np.float64)
            fired = scored["special_scores"][has, index] > 0
            threshold = special_thresholds[index]
        else:
            values = scored["cosines"][has, index].astype(np.float64) + scored["adjustment"][has]
            fired = scored["scores"][has, index] > 0
            threshold = thresholds[index]
        entry = ConceptCalibration(
            name, special, index, values, positive, plain(threshold), Confusion.of(fired, positive)
        )
        entry.labelled = has
        entry.conflicts = report.labels.conflicts.get(name, 0)
        entry.excluded = excluded.get(name, 0)
        _suggest(entry, fired, report.target, report.min_examples)
        report.concepts.append(entry)
    _rescore(report, samples)


def _suggest(entry: ConceptCalibration, fired: np.ndarray, target: Target, minimum: int) -> None:
    """Refuse with too few labels; else the best cut, keeping the current threshold when it
    already makes that cut (the smallest change)."""
    n_pos, n_neg = int(entry.positive.sum()), int((~entry.positive).sum())
    if n_pos < minimum or n_neg < minimum:
        short = [
            plural(minimum - n, f"more {word}")
            for n, word in ((n_pos, "positive"), (n_neg, "negative"))
            if n < minimum
        ]
        entry.refused = (
            f"needs {' and '.join(short)} (--min-examples {minimum}; "
            f"has {plural(n_pos, 'positive')}, {plural(n_neg, 'negative')})"
        )
        return
    cut = best_cut(entry.values, entry.positive, target)
    if cut is None:
        entry.refused = f"no threshold reaches {target.describe()} on these labels"
        return
    same = np.array_equal(fired, entry.values >= cut.high)
    entry.suggested_threshold = entry.threshold if same else short_threshold(cut)


def _rescore(report: Calibration, samples: list) -> None:
    """Counts of the suggested thresholds, scored by the engine's own arithmetic: every regular
    concept at once (they do not affect each other), each special-care concept on its own."""
    policy = report.policy
    regular = [c for c in report.concepts if not c.special and c.suggested_threshold is not None]
    embeddings = [s.embedding for s in samples]
    if regular:
        thresholds = policy.thresholds.clone()
        for c in regular:
            thresholds[c.index] = c.suggested_threshold
        scored = _score_all(dataclasses.replace(policy, thresholds=thresholds), embeddings)
        for c in regular:
            c.suggested = Confusion.of(scored["scores"][c.labelled, c.index] > 0, c.positive)
    for c in report.concepts:
        if c.special and c.suggested_threshold is not None:
            special = policy.special_thresholds.clone()
            special[c.index] = c.suggested_threshold
            scored = _score_all(dataclasses.replace(policy, special_thresholds=special), embeddings)
            fired = scored["special_scores"][c.labelled, c.index] > 0
            c.suggested = Confusion.of(fired, c.positive)
