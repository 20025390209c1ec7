"""score() default semantics and decide(): verdicts, actions, errors, edges of batch and policy size."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moderation.decision import NON_FINITE, decide
from moderation.errors import ModerationError
from moderation.scoring import score
from policy.compiled import CompiledPolicy
from policy.errors import PolicyError
from tests.policy_factory import random_policy


def loop_reference(policy: CompiledPolicy, embeddings: torch.Tensor):
    """The default semantics written out per image and per concept, in float64."""
    emb = embeddings.double().numpy()
    concepts = policy.concept_matrix.double().numpy()
    special = policy.special_matrix.double().numpy()
    rows = []
    for e in emb:
        unit = e / math.sqrt(sum(v * v for v in e))
        special_hit = False
        for s in range(len(special)):
            cos = sum(a * b for a, b in zip(unit, special[s], strict=True))
            if cos - float(policy.special_thresholds[s]) > 0:
                special_hit = True
        adjustment = policy.adjustment if special_hit else 0.0
        scores = []
        for c in range(len(concepts)):
            cos = sum(a * b for a, b in zip(unit, concepts[c], strict=True))
            scores.append(cos - float(policy.thresholds[c]) + adjustment)
        rows.append((special_hit, scores))
    return rows


def test_default_semantics_match_a_loop():
    policy = random_policy(13, 4, 16, adjustment=0.05)
    embeddings = torch.randn(9, 16, generator=torch.Generator().manual_seed(1))
    result = score(policy, embeddings)
    assert result.scores.shape == (9, 13) and result.special_scores.shape == (9, 4)
    reference = loop_reference(policy, embeddings)
    hits = torch.tensor([hit for hit, _ in reference])
    expected = torch.tensor([s for _, s in reference], dtype=torch.float64)
    assert torch.equal(result.special_hit, hits)
    assert hits.any() and not hits.all()  # both branches of the adjustment are exercised
    torch.testing.assert_close(result.scores.double(), expected, atol=1e-6, rtol=0)
    assert (expected.abs() > 1e-5).all()  # so the fired masks must agree exactly
    assert torch.equal(result.fired, expected > 0)
    assert torch.equal(result.adjustment, hits.float() * 0.05)
    assert result.valid.all()


def test_scores_stay_on_the_embeddings_device_and_dtype():
    policy = random_policy()
    result = score(policy, torch.randn(3, 16).half())
    for t in (result.cosines, result.scores, result.special_scores, result.adjustment):
        assert t.dtype == torch.float32 and t.device == torch.device("cpu")


def test_wrong_width_is_a_clear_error():
    with pytest.raises(ModerationError, match=r"expected \[batch, 16\]"):
        score(random_policy(), torch.randn(2, 8))


def test_decide_actions_verdicts_margin():
    # Image i lies on concept i: c0 fires (blur), c1 fires (blackout), c2 sits in the review
    # band, c3 is out of reach.
    base = random_policy(
        4,
        1,
        8,
        actions=["blur", "blackout", "blur", "pixelate"],
        review_band=0.02,
        escalate="review",
    )
    # Near, not on, each concept: thresholds stay cosines (within [-1, 1]) on every side.
    noise = 0.1 * torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    embeddings = F.normalize(base.concept_matrix + noise)
    cos = score(base, embeddings).cosines
    thresholds = torch.stack(
        [cos[0, 0] - 0.1, cos[1, 1] - 0.1, cos[2, 2] + 0.01, torch.tensor(1.0)]
    )
    assert cos[3, 3] < 1 - 0.02  # out of reach, and out of the review band
    policy = dataclasses.replace(
        base, thresholds=thresholds, special_thresholds=torch.tensor([1.0]), digest=""
    )
    result = score(policy, embeddings)
    decisions = decide(policy, result, metadata={"prompt": "x"})
    assert [d.action for d in decisions] == ["blur", "blackout", "review", "allow"]
    assert [d.verdict for d in decisions] == ["flag", "flag", "review", "allow"]
    assert decisions[0].fired[0] == "c0" and "c1" in decisions[1].fired
    assert decisions[2].fired == () and decisions[3].fired == ()
    for i, d in enumerate(decisions):
        row = result.scores[i]
        assert d.margin == pytest.approx(float(row.max()))
        assert d.top_concept == f"c{int(row.argmax())}"
        assert d.metadata == {"prompt": "x"}
        assert d.scores.dtype == np.float32 and d.scores.shape == (4,)


def test_most_severe_action_and_special_care_escalation():
    policy = random_policy(
        3,
        1,
        8,
        actions=["blur", "blackout", "pixelate"],
        escalate="pixelate",
        thresholds=[0.3, 0.4, 0.4],
    )
    policy = dataclasses.replace(policy, special_thresholds=torch.tensor([0.3]), digest="")
    embeddings = torch.randn(40, 8, generator=torch.Generator().manual_seed(3))
    result = score(policy, embeddings)
    decisions = decide(policy, result)
    rank = {"allow": 0, "review": 1, "blur": 2, "pixelate": 3, "blackout": 4}
    seen = {"mixed actions": 0, "escalated": 0}
    for i, d in enumerate(decisions):
        fired = [policy.actions[j] for j in range(3) if result.scores[i, j] > 0]
        expected = max([rank[a] for a in fired], default=0)
        seen["mixed actions"] += len(set(fired)) > 1
        if bool(result.special_hit[i]):
            seen["escalated"] += expected < rank["pixelate"]
            expected = max(expected, rank["pixelate"])
            assert d.special_hits == ("s0",)
        else:
            assert d.special_hits == ()
        assert rank[d.action] == expected
        assert d.fired == tuple(f"c{j}" for j in range(3) if result.scores[i, j] > 0)
    # The batch exercises every rule: each action wins somewhere, and escalation changes some.
    assert {d.action for d in decisions} == {"allow", "blur", "pixelate", "blackout"}
    assert seen["mixed actions"] > 0 and seen["escalated"] > 0


def test_nan_embedding_is_an_error_with_on_error_action():
    policy = random_policy(on_error="pixelate")
    embeddings = torch.randn(3, 16)
    embeddings[1, 4] = float("nan")
    embeddings[2, 0] = float("inf")
    result = score(policy, embeddings)
    assert result.valid.tolist() == [True, False, False]
    decisions = decide(policy, result, embeddings=embeddings)
    assert decisions[0].verdict != "error"
    for d in decisions[1:]:
        assert (d.verdict, d.action, d.error) == ("error", "pixelate", NON_FINITE)
        assert d.margin is None and d.top_concept is None and d.fired == ()
    assert decisions[0].embedding.shape == (1, 16)  # one view


def test_error_strings_get_the_policy_on_error():
    policy = random_policy(thresholds=torch.full((6,), 1.0), on_error="review")
    result = score(policy, torch.randn(2, 16))
    decisions = decide(policy, result, errors=[None, "decoder crashed"])
    assert decisions[0].verdict == "allow"
    assert (decisions[1].verdict, decisions[1].error) == ("error", "decoder crashed")
    assert decisions[1].action == "review"


def test_on_error_allow_cannot_reach_decide():
    # Fail closed in one place: a policy that would pass unjudged images does not exist.
    with pytest.raises(PolicyError) as info:
        random_policy(on_error="allow")
    assert str(info.value) == (
        "compiled policy 'test': on_error must not be 'allow': an image that could not be"
        " checked must not pass unchecked"
    )


def test_empty_batch():
    policy = random_policy()
    result = score(policy, torch.zeros(0, 16))
    assert result.scores.shape == (0, 6) and result.special_hit.shape == (0,)
    assert decide(policy, result, embeddings=torch.zeros(0, 16)) == []


def test_no_concepts_and_no_special_care():
    policy = random_policy(0, 0, 16)
    result = score(policy, torch.randn(2, 16))
    assert result.scores.shape == (2, 0) and result.special_scores.shape == (2, 0)
    decisions = decide(policy, result)
    assert [(d.verdict, d.margin, d.top_concept) for d in decisions] == [("allow", None, None)] * 2


def test_large_policy():
    policy = random_policy(10_000, 3, 32, seed=5)
    embeddings = torch.randn(4, 32)
    result = score(policy, embeddings)
    decisions = decide(policy, result, embeddings=embeddings)
    fired = result.scores > 0
    for i, d in enumerate(decisions):
        assert len(d.fired) == int(fired[i].sum()) > 0
        assert d.fired[0] == f"c{int(torch.nonzero(fired[i])[0])}"
        assert d.scores.shape == (10_000,)


@pytest.mark.parametrize("escalate, expected", [("review", True), ("blur", True), ("allow", False)])
def test_special_care_hits_need_review_only_when_they_escalate(escalate, expected):
    policy = random_policy(2, 1, 8, escalate=escalate, thresholds=torch.full((2,), 1.0))
    policy = dataclasses.replace(policy, special_thresholds=torch.tensor([-1.0]), digest="")
    (decision,) = decide(policy, score(policy, torch.randn(1, 8)))
    assert decision.special_hits == ("s0",)
    assert decision.needs_review is expected


def test_score_many_matches_score_per_policy_and_keeps_views():
    from moderation.scoring import score_many

    policies = [
        random_policy(seed=1, adjustment=0.05),
        random_policy(n_concepts=3, n_special=0, seed=2),
        random_policy(n_concepts=9, n_special=4, seed=3, compat="diffusers", adjustment=0.01),
    ]
    g = torch.Generator().manual_seed(7)
    embeddings = torch.randn(10, 16, generator=g)
    owners = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5])
    together = score_many(policies, embeddings, owners, 6)
    for policy, got in zip(policies, together, strict=True):
        alone = score(policy, embeddings, owners, 6)
        assert got.scores.shape == alone.scores.shape
        torch.testing.assert_close(got.cosines, alone.cosines)
        torch.testing.assert_close(got.special_cosines, alone.special_cosines)
        assert torch.equal(got.concept_views, alone.concept_views)
        assert torch.equal(got.special_views, alone.special_views)
        assert torch.equal(got.fired, alone.fired)
        assert torch.equal(got.valid, alone.valid)


def test_score_many_refuses_policies_of_another_width():
    from moderation.scoring import score_many

    with pytest.raises(ModerationError, match="model"):
        score_many([random_policy(), random_policy(dim=8)], torch.randn(2, 16))


def test_scores_from_logged_cosines_are_the_scores():
    from moderation.scoring import scores_from_cosines

    for policy in (
        random_policy(seed=4, adjustment=0.03),
        random_policy(seed=5, compat="diffusers", adjustment=0.01),
    ):
        fresh = score(policy, torch.randn(8, 16, generator=torch.Generator().manual_seed(9)))
        again = scores_from_cosines(policy, fresh.cosines, fresh.special_cosines, fresh.valid)
        assert torch.equal(again.scores, fresh.scores)
        assert torch.equal(again.special_scores, fresh.special_scores)
        assert torch.equal(again.adjustment, fresh.adjustment)


def test_vector_digests_name_each_vector():
    policy = random_policy(seed=6)
    moved = dataclasses.replace(policy, thresholds=policy.thresholds + 0.1, digest="")
    other = random_policy(seed=8)
    concepts, special = policy.vector_digests
    assert len(concepts) == 6 and len(special) == 2 and len(set(concepts)) == 6
    assert moved.vector_digests == policy.vector_digests  # thresholds are not the vector
    assert not set(other.vector_digests[0]) & set(concepts)
