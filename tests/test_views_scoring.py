"""Several views per image: each concept's cosine is its maximum over the image's views, the
decision says which view gave it, a bad view fails the whole image closed, and the log keeps
every view's embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sqlalchemy import select

from moderation.decision import NON_FINITE
from moderation.engine import Moderator
from moderation.scoring import max_over_views, score
from moderation.storage import DecisionLog, DecisionRow, db
from moderation.storage.records import record_from_row
from tests.policy_factory import random_policy


def views_of(n_views: list[int], dim=16, seed=1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(sum(n_views), dim, generator=g)  # [N, D]
    owners = torch.repeat_interleave(torch.arange(len(n_views)), torch.tensor(n_views))  # [N]
    return embeddings, owners


def test_max_over_views_matches_a_loop():
    values = torch.tensor([[0.1, 0.5], [0.3, 0.2], [0.3, -1.0], [0.0, 0.0], [-0.5, 0.9]])
    owners = torch.tensor([0, 0, 0, 1, 2])
    best, which = max_over_views(values, owners, 3)
    assert torch.equal(best, torch.tensor([[0.3, 0.5], [0.0, 0.0], [-0.5, 0.9]]))
    # Ties go to the first view holding the maximum; indexes are within each image.
    assert which.tolist() == [[1, 0], [0, 0], [0, 0]]


def test_a_nan_view_is_the_maximum_so_it_cannot_hide():
    values = torch.tensor([[0.1], [float("nan")], [0.2]])
    best, which = max_over_views(values, torch.tensor([0, 0, 1]), 2)
    assert torch.isnan(best[0, 0]) and best[1, 0] == pytest.approx(0.2)
    assert which.tolist() == [[1], [0]]


def test_scores_over_views_are_the_scores_of_the_best_view():
    policy = random_policy(adjustment=0.02)
    embeddings, owners = views_of([3, 1, 2])
    grouped = score(policy, embeddings, owners)
    single = score(policy, embeddings)  # every view as if it were an image
    for image, rows in enumerate(([0, 1, 2], [3], [4, 5])):
        cos = single.cosines[rows]  # [V, C]
        assert torch.equal(grouped.cosines[image], cos.max(dim=0).values)
        assert torch.equal(grouped.concept_views[image], cos.argmax(dim=0))
        # Special care: any view's hit adjusts every concept of the image.
        hit = bool(single.special_hit[rows].any())
        assert bool(grouped.special_hit[image]) == hit
        expected = cos.max(dim=0).values - policy.thresholds + (0.02 if hit else 0.0)
        assert torch.allclose(grouped.scores[image], expected)


def test_one_non_finite_view_makes_the_image_an_error():
    policy = random_policy()
    embeddings, owners = views_of([2, 2])
    embeddings[1, 3] = float("inf")
    decisions = Moderator(policy).moderate_embeddings(embeddings, owners=owners)
    assert [d.verdict for d in decisions] == ["error", decisions[1].verdict]
    assert decisions[0].error == NON_FINITE and decisions[0].action == policy.on_error
    assert decisions[1].verdict != "error"


def test_decisions_carry_views_and_which_view_fired():
    policy = random_policy(thresholds=[-1.0] * 6)  # every concept fires everywhere
    embeddings, owners = views_of([3, 1])
    views = [
        [
            {"frame": 0, "box": [0, 0, 10, 10]},
            {"frame": 0, "box": [0, 5, 10, 15]},
            {"frame": 1, "box": [0, 0, 10, 10]},
        ],
        [{"frame": 0, "box": [0, 0, 10, 10]}],
    ]
    decisions = Moderator(policy).moderate_embeddings(embeddings, owners=owners, views=views)
    expected = score(policy, embeddings, owners).concept_views
    assert decisions[0].views == views[0]
    assert decisions[0].concept_views.dtype == np.int16
    assert decisions[0].concept_views.tolist() == expected[0].tolist()
    assert decisions[0].embedding.shape == (3, 16) and decisions[1].embedding.shape == (1, 16)
    np.testing.assert_allclose(decisions[0].embedding, embeddings[:3].numpy())


def test_views_round_trip_through_the_log(db_url, tmp_path):
    policy = random_policy()
    embeddings, owners = views_of([3, 1])
    views = [[{"frame": f, "box": [0, 8 * f, 16, 16 + 8 * f]} for f in range(3)], None]
    log = DecisionLog(db_url, spool_dir=tmp_path / "spool", held_dir=tmp_path / "held")
    with Moderator(policy, log=log) as moderator:
        decisions = moderator.moderate_embeddings(embeddings, owners=owners, views=views)
    with db.engine_for(db_url).connect() as conn:
        rows = {r["id"]: r for r in conn.execute(select(DecisionRow.__table__)).mappings()}
    many, one = (record_from_row(dict(rows[d.decision_id])) for d in decisions)
    assert many.views == views[0] and one.views is None
    assert many.embedding.shape == (3, 16) and one.embedding.shape == (1, 16)
    np.testing.assert_allclose(many.embedding, embeddings[:3].numpy(), atol=2e-3)  # float16
    assert many.concept_views.tolist() == decisions[0].concept_views.tolist()
    assert one.concept_views.tolist() == decisions[1].concept_views.tolist()
    assert many.shadow_of is None
