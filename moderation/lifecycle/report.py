"""The report `policy backtest` and `policy shadow-report` share: what a candidate policy would
have done to decisions, against what was done.

`ReportBuilder` sums chunks of decisions as they stream past (counts only, plus up to K example
ids per transition), so its size does not grow with the history. Its `to_dict()` is the JSON
both commands print (the keys of issue 9, plus extras: "candidate", "decisions", "scored",
"skipped", "changed", "transitions", "verdicts", "concepts", "special_care", "reviewed",
"examples", "filters"); `moderation.cli.backtest_cmds.render` prints it as text.

"flagged" means action != allow: a review hides the image from the caller too. A decision's
human verdict is its newest review item's status when that is approved or rejected.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from policy.vocabulary import ACTIONS, VERDICTS

HUMAN = {"approved": 1, "rejected": 2}  # 0: nobody decided (pending, claimed or no item)


class Vocabulary:
    """Small integer codes for action or verdict names; a name never seen before gets a new one."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names: list[str] = list(names)
        self.code = {n: i for i, n in enumerate(self.names)}

    def codes(self, values: Iterable[str]) -> np.ndarray:
        code = self.code
        out = []
        for v in values:
            c = code.get(v)
            if c is None:
                c = code[v] = len(self.names)
                self.names.append(v)
            out.append(c)
        return np.asarray(out, dtype=np.int64)


def human_codes(statuses: Iterable[str | None]) -> np.ndarray:
    """Per decision 1 (approved), 2 (rejected) or 0 (no human verdict)."""
    return np.asarray([HUMAN.get(s, 0) for s in statuses], dtype=np.int64)


class ReportBuilder:
    """Counts of one report; `add` takes one chunk of scored decisions at a time."""

    def __init__(self, candidate: Mapping[str, Any], *, examples: int, filters: Mapping[str, Any]):
        self.candidate = dict(candidate)
        self.k = examples
        self.filters = dict(filters)
        self.actions = Vocabulary(ACTIONS)
        self.verdicts = Vocabulary(VERDICTS)
        self.decisions = 0
        self.skipped: Counter[str] = Counter()
        self.action_pairs: Counter[tuple[int, int]] = Counter()
        self.verdict_pairs: Counter[tuple[int, int]] = Counter()
        self.concepts: dict[str, list[int]] = {}
        self.special: dict[str, list[int]] = {}
        self.reviewed = {
            "approved": {"total": 0, "now_flagged": 0, "was_flagged": 0},
            "rejected": {"total": 0, "now_allowed": 0, "was_allowed": 0},
        }
        self.examples: dict[tuple[int, int], list[str]] = {}
        self.notes: list[str] = []

    def read(self, n: int) -> None:
        """`n` more decisions were read (scored or skipped)."""
        self.decisions += n

    def skip(self, reason: str, n: int = 1) -> None:
        if n:
            self.skipped[reason] += n

    def add(
        self,
        ids: Sequence[str],
        before_action: np.ndarray,
        after_action: np.ndarray,
        before_verdict: np.ndarray,
        after_verdict: np.ndarray,
        human: np.ndarray,
    ) -> None:
        """One chunk of scored decisions, oldest first: codes of `self.actions` / `self.verdicts`
        and `human_codes`, one entry per id."""
        n = len(ids)
        if not n:
            return
        width = max(len(self.actions.names), 1)
        pairs = before_action * width + after_action
        found, counts = np.unique(pairs, return_counts=True)
        for pair, count in zip(found.tolist(), counts.tolist(), strict=True):
            key = divmod(pair, width)
            self.action_pairs[key] += count
            taken = self.examples.setdefault(key, [])
            if len(taken) < self.k:
                where = np.flatnonzero(pairs == pair)[: self.k - len(taken)]
                taken.extend(ids[i] for i in where.tolist())
        vwidth = max(len(self.verdicts.names), 1)
        vpairs = before_verdict * vwidth + after_verdict
        found, counts = np.unique(vpairs, return_counts=True)
        for pair, count in zip(found.tolist(), counts.tolist(), strict=True):
            self.verdict_pairs[divmod(pair, vwidth)] += count
        allow = self.actions.code["allow"]
        approved, rejected = human == HUMAN["approved"], human == HUMAN["rejected"]
        a, r = self.reviewed["approved"], self.reviewed["rejected"]
        a["total"] += int(approved.sum())
        # Flagged: the verdict `flag` (acted on). A `review` verdict is a question to a person,
        # not a block: every reviewed image had one, so counting it would make every approved
        # image "flagged as logged".
        flag = self.verdicts.code["flag"]
        a["now_flagged"] += int((approved & (after_verdict == flag)).sum())
        a["was_flagged"] += int((approved & (before_verdict == flag)).sum())
        r["total"] += int(rejected.sum())
        r["now_allowed"] += int((rejected & (after_action == allow)).sum())
        r["was_allowed"] += int((rejected & (before_action == allow)).sum())

    def fired(self, names: Sequence[str], fired: np.ndarray, when: str, *, special=False) -> None:
        """Add how often each concept fired ([n, C] bool, columns named by `names`) `when`
        ("before": as logged, "after": with the candidate)."""
        table = self.special if special else self.concepts
        slot = 0 if when == "before" else 1
        sums = fired.sum(axis=0).tolist() if fired.size else [0] * len(names)
        for name, count in zip(names, sums, strict=True):
            table.setdefault(name, [0, 0])[slot] += int(count)

    def declare(self, names: Iterable[str], *, special: bool = False) -> None:
        """Concepts reported even when they never fire (the candidate's, the logged policies')."""
        table = self.special if special else self.concepts
        for name in names:
            table.setdefault(name, [0, 0])

    def to_dict(self) -> dict[str, Any]:
        a, v = self.actions.names, self.verdicts.names
        skipped = sum(self.skipped.values())
        changed = sum(n for (old, new), n in self.action_pairs.items() if old != new)
        order = sorted(self.action_pairs, key=lambda p: (p[0] == p[1], -self.action_pairs[p], p))
        return {
            "candidate": self.candidate,
            "decisions": self.decisions,
            "scored": self.decisions - skipped,
            "skipped": dict(sorted(self.skipped.items())),
            "changed": changed,
            "transitions": {f"{a[o]}->{a[n]}": self.action_pairs[(o, n)] for o, n in order},
            "verdicts": {
                f"{v[o]}->{v[n]}": c
                for (o, n), c in sorted(
                    self.verdict_pairs.items(), key=lambda i: (i[0][0] == i[0][1], -i[1], i[0])
                )
            },
            "concepts": {k: {"before": b, "after": f} for k, (b, f) in self.concepts.items()},
            "special_care": {k: {"before": b, "after": f} for k, (b, f) in self.special.items()},
            "reviewed": {k: dict(val) for k, val in self.reviewed.items()},
            "examples": {f"{a[o]}->{a[n]}": list(self.examples.get((o, n), [])) for o, n in order},
            "filters": self.filters,
            "notes": list(self.notes),
        }
