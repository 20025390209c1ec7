"""The one decision rule (moderation.kernel.rule): the live policy, K shadow candidates in one
pass and the backtest agree on random policies and embeddings, margins of 0 and None included;
the reason recorded at decision time is what the old after-the-fact derivation gave; and no
other module ranks actions.

Embeddings and concept vectors have four entries of +-0.5 (or one of +-1): their norms are exactly
1 and every cosine is an exact multiple of 0.25, whatever order a matrix product sums in, so the
three paths see the very same cosines and scores of exactly 0 are common.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moderation.engine import Moderator
from moderation.kernel.document import Facts, ruled
from moderation.lifecycle.backtest import Backtest, plan_for
from moderation.lifecycle.report import ReportBuilder
from moderation.storage.records import policy_record
from policy.compiled import CompiledPolicy
from tests.kernel_factory import DIM, exact_rows, policy

ROOT = Path(__file__).resolve().parent.parent


def backtest_actions(candidate: CompiledPolicy, live: list) -> list[tuple[str, str]]:
    """(action, verdict) of `candidate` over the logged cosines of `live` (its own decisions):
    the backtest's own chunk scoring (moderation.lifecycle.backtest)."""
    report = ReportBuilder({"name": "c"}, examples=0, filters={})
    run = Backtest(candidate, report)
    record = policy_record(candidate)
    run.add_policies({candidate.digest: record})
    rows = [
        (
            candidate.digest,
            "m",
            d.verdict,
            d.action,
            d.cosines.astype("<f4").tobytes(),
            d.scores.astype("<f4").tobytes(),
            d.special_cosines.astype("<f4").tobytes(),
            d.special_scores.astype("<f4").tobytes(),
        )
        for d in live
    ]
    actions, verdicts = run._group(plan_for(candidate, record), rows)
    return [
        (report.actions.names[a], report.verdicts.names[v])
        for a, v in zip(actions.tolist(), verdicts.tolist(), strict=True)
    ]


def old_winner(decision, policy_row) -> str:
    """What set the action, as `decisions show` worked it out after the fact before the reason
    was recorded (review/decisions.winner and labels.near_misses at 3bc3cc7), kept here as the
    reference that recorded reasons are checked against."""
    if decision.verdict == "error":
        return "error"
    scores = np.frombuffer(decision.scores, dtype="<f4")
    fired = set(decision.fired)
    concepts = policy_row.concepts
    if any(c["name"] in fired and c["action"] == decision.action for c in concepts):
        return "concept"
    escalate = policy_row.escalate
    if decision.special_hits and escalate not in (None, "allow") and escalate == decision.action:
        return "special_care"
    band = float(policy_row.review_band or 0.0)
    near = band > 0 and scores.size == len(concepts) and ((scores > -band) & (scores <= 0)).any()
    if decision.action == "review" and near:
        return "review_band"
    if decision.action == "allow" and not decision.fired:
        return "nothing_fired"
    return "unknown"


def old_winner_concept(decision, policy_row) -> str | None:
    """The concept the old derivation named: the highest-scoring fired concept of the action."""
    scores = np.frombuffer(decision.scores, dtype="<f4")
    same = [
        (float(scores[i]), -i, c["name"])
        for i, c in enumerate(policy_row.concepts)
        if c["name"] in decision.fired and c["action"] == decision.action
    ]
    return max(same)[2] if same else None


def logged_row(d) -> SimpleNamespace:
    """A decisions row of `d` as an older version logged it (no recorded reason)."""
    return SimpleNamespace(
        verdict=d.verdict,
        action=d.action,
        fired=list(d.fired),
        special_hits=list(d.special_hits),
        scores=np.asarray(d.scores, "<f4").tobytes(),
        special_scores=np.asarray(d.special_scores, "<f4").tobytes(),
        error=d.error,
    )


def old_row_facts(d, record) -> Facts:
    """The facts of `d` read back from a row written before reasons were recorded."""
    concepts = record.concepts
    return Facts(
        decision_id=d.decision_id,
        created_at=d.created_at,
        policy={"escalate": record.escalate, "review_band": record.review_band},
        names=[c["name"] for c in concepts],
        categories=[None] * len(concepts),
        severities=[None] * len(concepts),
        actions=[c["action"] for c in concepts],
        thresholds=[c["threshold"] for c in concepts],
        special_names=[c["name"] for c in record.special_concepts],
        special_thresholds=[c["threshold"] for c in record.special_concepts],
        verdict=d.verdict,
        action=d.action,
        reason=None,
        reason_concept=None,
        fired=list(d.fired),
        special_hits=list(d.special_hits),
        adjustment=d.adjustment,
        margin=d.margin,
        top_concept=d.top_concept,
        cosines=np.asarray(d.cosines, np.float32),
        scores=np.asarray(d.scores, np.float32),
        special_cosines=np.asarray(d.special_cosines, np.float32),
        special_scores=np.asarray(d.special_scores, np.float32),
        concept_views=None,
        special_views=None,
        views=None,
        image_sha256=None,
        metadata={},
        error=d.error,
        shadow_of=None,
        recorded=True,
    )


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    sizes=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2)), min_size=1, max_size=3),
    n_images=st.integers(1, 6),
    broken=st.booleans(),
)
def test_live_shadow_and_backtest_decide_alike(seed, sizes, n_images, broken):
    g = torch.Generator().manual_seed(seed)
    live_policy = policy(g, "live", 3, 1)
    candidates = [policy(g, f"c{k}-", n, s) for k, (n, s) in enumerate(sizes)]
    embeddings = exact_rows(g, n_images)
    if broken:
        embeddings[0, 0] = float("nan")  # an image that cannot be scored: margin None
    shadowed = Moderator(live_policy, shadow=candidates).moderate_embeddings(embeddings)
    for k, candidate in enumerate(candidates):
        alone = Moderator(candidate).moderate_embeddings(embeddings)
        shadows = [d.shadows[k] for d in shadowed]
        for own, shadow in zip(alone, shadows, strict=True):
            fields = ("verdict", "action", "fired", "special_hits", "margin", "top_concept")
            fields += ("adjustment", "action_reason", "reason_concept")
            assert [getattr(shadow, f) for f in fields] == [getattr(own, f) for f in fields]
            assert shadow.scores.tobytes() == own.scores.tobytes()
            if not candidate.concept_names or own.verdict == "error":
                assert own.margin is None
        scored = [d for d in alone if d.verdict != "error"]
        assert backtest_actions(candidate, scored) == [(d.action, d.verdict) for d in scored]

        record = policy_record(candidate)
        for d in alone:
            # The recorded reason is what the old derivation gives on the logged row...
            row = logged_row(d)
            assert d.action_reason == old_winner(row, record)
            if d.action_reason == "concept":
                assert d.reason_concept == old_winner_concept(row, record)
            # ...and a row logged without one gets it from the rule over its logged scores.
            derived = ruled(old_row_facts(d, record))
            assert (derived.reason, derived.reason_concept) == (d.action_reason, d.reason_concept)


def test_margins_of_zero_are_exercised():
    """The grid makes scores of exactly 0 (not fired, in the band) common: check one by hand."""
    g = torch.Generator().manual_seed(0)
    p = CompiledPolicy(
        name="p",
        version="1",
        model="m",
        concept_names=("a", "b"),
        categories=(None, None),
        severities=("high", "high"),
        actions=("blur", "blackout"),
        concept_matrix=exact_rows(g, 2),
        thresholds=torch.zeros(2),
        review_band=0.1,
    )
    x = torch.zeros(1, DIM)
    x[0, int(torch.nonzero(p.concept_matrix[0] == 0)[0])] = 1.0  # orthogonal to concept a
    (d,) = Moderator(p).moderate_embeddings(x)
    assert 0.0 in d.scores.tolist() and d.margin is not None and d.margin >= 0.0
    if d.margin == 0.0:  # nothing fired; a score of 0 is within the band
        assert (d.action, d.action_reason) == ("review", "review_band")


# What ranks actions or applies the review band: only moderation/kernel/rule.py may.
RANKING = [
    re.compile(r"ACTION_RANK\["),  # an action's rank looked up to compare actions
    re.compile(r"(?<!decision)\.action_ranks\b"),  # CompiledPolicy's rank tensor, read directly
    re.compile(r"reduceat\(.*(rank|band|fired)"),  # NumPy's per-policy rules (the old shadow rule)
    re.compile(r">\s*-\s*\(?\s*\w*band"),  # `score > -band`: the review band test
    re.compile(r"\.amax\(.*rank|rank.*\.amax\("),
]


def test_no_second_implementation_of_the_action_ranking():
    found = []
    for path in sorted((ROOT / "moderation").rglob("*.py")):
        if path.relative_to(ROOT).as_posix() in ("moderation/kernel/rule.py",):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(p.search(code) for p in RANKING):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []


def test_the_ranking_grep_can_fail():
    assert any(p.search("rank = (fired.long() * policy.action_ranks).amax(dim=1)") for p in RANKING)
    assert any(p.search("in_band = (scores > -band) & (scores <= 0)") for p in RANKING)
    assert any(p.search("np.maximum.reduceat(np.where(fired, ranks, 0), start)") for p in RANKING)
