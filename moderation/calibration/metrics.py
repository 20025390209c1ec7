"""Confusion counts, Wilson intervals and the threshold search of `policy calibrate` (numpy only)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile
# Knob: how far below the lowest labelled value a threshold that fires on everything is put.
BELOW_ALL = 0.01


def wilson(successes: int, trials: int) -> list[float] | None:
    """The 95% Wilson score interval [low, high] of a proportion; None without trials."""
    if trials == 0:
        return None
    p = successes / trials
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = Z95 * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


@dataclass(frozen=True)
class Confusion:
    """Counts of one concept on labelled images: fired/not fired against shows/does not show."""

    tp: int
    fp: int
    fn: int
    tn: int

    @classmethod
    def of(cls, fired: np.ndarray, positive: np.ndarray) -> Confusion:
        """From [N] bool arrays over the images labelled for the concept."""
        fired, positive = fired.astype(bool), positive.astype(bool)
        return cls(
            tp=int((fired & positive).sum()),
            fp=int((fired & ~positive).sum()),
            fn=int((~fired & positive).sum()),
            tn=int((~fired & ~positive).sum()),
        )

    @property
    def precision(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def fpr(self) -> float | None:
        return _ratio(self.fp, self.fp + self.tn)

    def to_dict(self, threshold: float) -> dict:
        """The JSON shape: threshold, counts, rates and their 95% Wilson intervals."""
        return {
            "threshold": threshold,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
            "precision": self.precision,
            "recall": self.recall,
            "fpr": self.fpr,
            "precision_ci": wilson(self.tp, self.tp + self.fp),
            "recall_ci": wilson(self.tp, self.tp + self.fn),
            "fpr_ci": wilson(self.fp, self.fp + self.tn),
        }


@dataclass(frozen=True)
class Target:
    """What a suggested threshold must reach: a precision, or a false-positive-rate ceiling."""

    precision: float | None = None
    max_fpr: float | None = None

    def met(self, c: Confusion) -> bool:
        if c.tp == 0:
            return False  # a threshold that catches nothing meets no target worth having
        if self.max_fpr is not None:
            return (c.fpr or 0.0) <= self.max_fpr
        return (c.precision or 0.0) >= (self.precision if self.precision is not None else 0.0)

    def describe(self) -> str:
        if self.max_fpr is not None:
            return f"a false positive rate of at most {self.max_fpr:g}"
        return f"a precision of at least {self.precision:g}"


@dataclass(frozen=True)
class Cut:
    """A threshold range [low, high) that fires exactly on the labelled values >= high."""

    low: float
    high: float
    confusion: Confusion

    def contains(self, threshold: float) -> bool:
        return self.low <= threshold < self.high


def best_cut(values: np.ndarray, positive: np.ndarray, target: Target) -> Cut | None:
    """The cut with the best recall among those meeting `target` (fewest false positives on a
    tie); None when none does. A concept fires where value > threshold."""
    order = np.argsort(-values, kind="stable")
    values, positive = values[order], positive[order].astype(bool)
    distinct, starts = np.unique(-values, return_index=True)  # ascending -value: descending value
    tp = np.cumsum(positive)
    fp = np.cumsum(~positive)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    best: Cut | None = None
    for k in range(len(distinct)):
        end = (starts[k + 1] if k + 1 < len(starts) else len(values)) - 1  # last index >= value
        c = Confusion(int(tp[end]), int(fp[end]), n_pos - int(tp[end]), n_neg - int(fp[end]))
        if target.met(c) and (best is None or c.tp > best.confusion.tp):
            high = float(-distinct[k])
            low = float(-distinct[k + 1]) if k + 1 < len(distinct) else high - BELOW_ALL
            best = Cut(max(low, -1.0), high, c)
    return best


def short_threshold(cut: Cut) -> float:
    """The shortest decimal in the middle half of the cut, within [-1, 1]: as far from the
    labelled values on either side as a short number allows, so that it does not hinge on
    the last digits of a cosine."""
    margin = (cut.high - cut.low) / 4
    middle = (cut.low + cut.high) / 2
    for digits in range(2, 10):
        value = round(middle, digits)
        if cut.low + margin <= value <= cut.high - margin:
            return max(-1.0, min(1.0, value))
    return max(-1.0, min(1.0, middle))
