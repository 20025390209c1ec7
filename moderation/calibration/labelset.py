"""Labelled images in memory: per image, which concepts it shows and which it does not.

Labels are kept compactly: an image reviewed under a policy shares that policy's set of concept
names with every other image of it (it says "shown" or "not shown" for each of them), so a
thousand reviewed images of a 10,000-concept policy do not hold ten million entries.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np


class Labels:
    """shows / does not show / says nothing, per concept name."""

    __slots__ = ("known", "shows", "changed")

    def __init__(self, known: frozenset[str], shows: Iterable[str] = ()) -> None:
        self.known = known  # the names it speaks about (shared between images)
        self.shows = frozenset(shows)
        self.changed: dict[str, bool | None] = {}  # merged or dropped labels

    def get(self, name: str) -> bool | None:
        if name in self.changed:
            return self.changed[name]
        return (name in self.shows) if name in self.known else None

    def names(self) -> Iterator[str]:
        """Every name it says something about."""
        for name in self.known:
            if self.changed.get(name, True) is not None:
                yield name
        for name, value in self.changed.items():
            if name not in self.known and value is not None:
                yield name

    def set(self, name: str, value: bool | None) -> None:
        self.changed[name] = value


@dataclass
class Sample:
    """One labelled image: its view embeddings and its labels."""

    key: str  # the image's pixel sha256, else "decision:ID"
    where: str  # "decision ID" or the file, for messages
    embedding: np.ndarray  # [V, D] float32
    labels: Labels
    file_sha256: str | None = None  # sha256 of a folder image's bytes


@dataclass
class LabelledSet:
    """Every labelled image, one Sample per distinct image."""

    samples: dict[str, Sample] = field(default_factory=dict)
    decisions: int = 0
    images: int = 0
    skipped: Counter = field(default_factory=Counter)
    conflicts: Counter = field(default_factory=Counter)  # concept -> images left out
    disputed: set[tuple[str, str]] = field(default_factory=set)  # (concept, sample key)

    def add(self, sample: Sample) -> None:
        """Add an image, or merge its labels into the same image seen before."""
        known = self.samples.get(sample.key)
        if known is None:
            self.samples[sample.key] = sample
            return
        for name in list(sample.labels.names()):
            if (name, sample.key) in self.disputed:
                continue
            shows, before = sample.labels.get(name), known.labels.get(name)
            if before is None:
                known.labels.set(name, shows)
            elif before != shows:  # the sources disagree: the image says nothing about it
                known.labels.set(name, None)
                self.disputed.add((name, sample.key))
                self.conflicts[name] += 1
        known.file_sha256 = known.file_sha256 or sample.file_sha256

    def exclude(self, concept: str, pixel: set[str], files: set[str]) -> int:
        """Drop the label for `concept` of the images given by pixel or file hash; how many."""
        dropped = 0
        for sample in self.samples.values():
            hit = sample.key in pixel or (sample.file_sha256 or "") in files
            if hit and sample.labels.get(concept) is not None:
                sample.labels.set(concept, None)
                dropped += 1
        return dropped

    def columns(self, names: list[str]) -> Iterator[np.ndarray]:
        """Per name, in order: [N] int8 over the samples, 1 shows, 0 does not, -1 says nothing.

        Built per group of images that share their set of names, not per image and name.
        """
        samples = list(self.samples.values())
        groups: dict[int, tuple[frozenset[str], list[int]]] = {}
        shown: dict[str, list[int]] = {}
        changed: dict[str, list[tuple[int, bool | None]]] = {}
        for i, s in enumerate(samples):
            groups.setdefault(id(s.labels.known), (s.labels.known, []))[1].append(i)
            for name in s.labels.shows:
                shown.setdefault(name, []).append(i)
            for name, value in s.labels.changed.items():
                changed.setdefault(name, []).append((i, value))
        index = {key: np.asarray(rows, dtype=np.int64) for key, (_, rows) in groups.items()}
        for name in names:
            column = np.full(len(samples), -1, dtype=np.int8)
            for key, (known, _) in groups.items():
                if name in known:
                    column[index[key]] = 0
            rows = [i for i in shown.get(name, ()) if name in samples[i].labels.known]
            column[rows] = 1
            for i, value in changed.get(name, ()):
                column[i] = -1 if value is None else int(value)
            yield column
